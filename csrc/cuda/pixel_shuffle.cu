// CUDA pixel shuffle: a dtype-agnostic permutation copy, forward (token layout -> shuffled) and
// backward (the same copy the other way). One block per (output row, segment); each segment is
// C contiguous elements on both sides, copied with the widest aligned vector (16 B when C *
// element size and the pointers allow: C = 3200 bf16 is 400 x 16 B).
#include <cutlass/array.h>

#include "device_utils.cuh"
#include "kernels.h"

namespace nvlm::cuda {
namespace {

constexpr int kThreads = 128;

template <int kBytes>
__global__ void __launch_bounds__(kThreads)
    shuffle_copy_kernel(const uint8_t* __restrict__ src, uint8_t* __restrict__ dst, Shuffle s,
                        int element_bytes, bool inverse) {
  using Vector = cutlass::AlignedArray<uint8_t, kBytes>;
  const int64_t parts = s.scale * s.scale;
  const int64_t segment = blockIdx.x;  // row * parts + part
  const int64_t segment_bytes = s.channels * element_bytes;
  const int64_t x_offset = segment_offset(segment / parts, segment % parts, s) * element_bytes;
  const int64_t out_offset = segment * segment_bytes;
  const auto* from = reinterpret_cast<const Vector*>(src + (inverse ? out_offset : x_offset));
  auto* to = reinterpret_cast<Vector*>(dst + (inverse ? x_offset : out_offset));
  for (int64_t i = threadIdx.x; i < segment_bytes / kBytes; i += kThreads) to[i] = from[i];
}

template <int kBytes>
cudaError_t launch(const void* src, void* dst, const Shuffle& s, int element_bytes, bool inverse,
                   cudaStream_t stream) {
  const int64_t segments = shuffle_rows(s) * s.scale * s.scale;
  shuffle_copy_kernel<kBytes><<<static_cast<unsigned>(segments), kThreads, 0, stream>>>(
      static_cast<const uint8_t*>(src), static_cast<uint8_t*>(dst), s, element_bytes, inverse);
  return cudaGetLastError();
}

}  // namespace

cudaError_t pixel_shuffle(const void* src, void* dst, const Shuffle& s, int element_bytes,
                          bool inverse, cudaStream_t stream) {
  if (shuffle_rows(s) == 0) return cudaSuccess;
  const int bytes = vector_bytes({static_cast<uint64_t>(s.channels * element_bytes),
                                  reinterpret_cast<uint64_t>(src), reinterpret_cast<uint64_t>(dst)});
  switch (bytes) {
    case 16: return launch<16>(src, dst, s, element_bytes, inverse, stream);
    case 8: return launch<8>(src, dst, s, element_bytes, inverse, stream);
    case 4: return launch<4>(src, dst, s, element_bytes, inverse, stream);
    case 2: return launch<2>(src, dst, s, element_bytes, inverse, stream);
    default: return launch<1>(src, dst, s, element_bytes, inverse, stream);
  }
}

}  // namespace nvlm::cuda
