// CUDA multimodal embedding assembly, forward and backward.
//
// Forward: one block per token copies its row, from the table (text id) or from the image row
// given by the token's running placeholder count (computed on the device by the caller), with the
// widest aligned vector (16 B when the row size, strides and pointers allow). The copy is
// dtype-agnostic. Ids outside the table or placeholders beyond the image rows give zero rows:
// no read out of bounds, even when contents were not validated.
//
// Backward: d image_embeds is the same kind of row copy (gather by placeholder position).
// d embed_weight: the text positions, sorted stably by id, form runs of equal ids, summed in
// position order in fp32 (NumericArrayConverter for fp16/bf16): deterministic, no atomics. A run
// longer than kTableGradChunk positions (template tokens, padding: thousands of rows in real SFT
// batches) would be one block's serial walk, so runs are cut at chunk boundaries: the block at a
// piece's first position sums the piece (at most a chunk) and writes the table row when the piece
// is the whole run, else an fp32 partial; table_grad_merge_kernel then adds each long run's
// partials chunk by chunk, in order (as the Triton kernels, ops/multimodal_embed.py).
#include <cutlass/array.h>
#include <cutlass/numeric_conversion.h>
#include <cutlass/numeric_types.h>

#include <type_traits>

#include "device_utils.cuh"
#include "kernels.h"

namespace nvlm::cuda {
namespace {

constexpr int kThreads = 128;

template <int kBytes>
__global__ void __launch_bounds__(kThreads)
    embed_rows_kernel(const int64_t* __restrict__ ids, const int32_t* __restrict__ image_index,
                      const uint8_t* __restrict__ table, int64_t table_stride_bytes,
                      const uint8_t* __restrict__ images, int64_t images_stride_bytes,
                      uint8_t* __restrict__ out, int64_t vocab, int64_t num_images,
                      int64_t row_bytes, int64_t image_token_id) {
  using Vector = cutlass::AlignedArray<uint8_t, kBytes>;
  const int64_t token = blockIdx.x;
  const int64_t id = ids[token];
  const uint8_t* source = nullptr;
  if (id == image_token_id) {
    const int64_t row = image_index[token];
    if (row >= 0 && row < num_images) source = images + row * images_stride_bytes;
  } else if (id >= 0 && id < vocab) {
    source = table + id * table_stride_bytes;
  }
  auto* target = reinterpret_cast<Vector*>(out + token * row_bytes);
  Vector zero;
  zero.fill(0);
  for (int64_t i = threadIdx.x; i < row_bytes / kBytes; i += kThreads) {
    target[i] = source != nullptr ? reinterpret_cast<const Vector*>(source)[i] : zero;
  }
}

template <int kBytes>
__global__ void __launch_bounds__(kThreads)
    gather_rows_kernel(const uint8_t* __restrict__ grad, const int64_t* __restrict__ positions,
                       uint8_t* __restrict__ grad_images, int64_t row_bytes) {
  using Vector = cutlass::AlignedArray<uint8_t, kBytes>;
  const int64_t row = blockIdx.x;
  const int64_t position = positions[row];  // -1: no placeholder for this image row
  auto* target = reinterpret_cast<Vector*>(grad_images + row * row_bytes);
  Vector zero;
  zero.fill(0);
  for (int64_t i = threadIdx.x; i < row_bytes / kBytes; i += kThreads) {
    target[i] = position >= 0 ? reinterpret_cast<const Vector*>(grad + position * row_bytes)[i] : zero;
  }
}

template <typename T, int kVec>
__device__ void store_row(T* target, const cutlass::Array<float, kVec>& total) {
  using Store = cutlass::AlignedArray<T, kVec>;
  Store result;
  static_cast<cutlass::Array<T, kVec>&>(result) = cutlass::NumericArrayConverter<T, float, kVec>()(total);
  *reinterpret_cast<Store*>(target) = result;
}

__device__ bool run_continues(const int64_t* sorted_keys, int64_t position, int64_t key, int64_t tokens) {
  return position < tokens && sorted_keys[position] == key;
}

// partials: (chunks, 2, dim) fp32; slot 0 of a chunk holds the piece that continues a run from
// the chunk before, slot 1 the piece that starts a run and goes on into the next chunk.
template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads)
    table_grad_kernel(const T* __restrict__ grad, const int64_t* __restrict__ sorted_keys,
                      const int64_t* __restrict__ order, T* __restrict__ grad_table,
                      float* __restrict__ partials, int64_t tokens, int64_t vocab, int64_t dim) {
  using Load = cutlass::AlignedArray<T, kVec>;
  using Partial = cutlass::AlignedArray<float, kVec>;
  const int64_t start = blockIdx.x;
  const int64_t key = sorted_keys[start];
  const bool run_start = start == 0 || sorted_keys[start - 1] != key;
  const int64_t chunk = start / kTableGradChunk;
  // key == vocab marks positions with no table gradient; other blocks are inside a piece
  if (key >= vocab || !(run_start || start % kTableGradChunk == 0)) return;
  const int64_t column = (static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x) * kVec;
  if (column >= dim) return;
  const int64_t end = min(tokens, (chunk + 1) * kTableGradChunk);
  cutlass::NumericArrayConverter<float, T, kVec> to_float;
  cutlass::Array<float, kVec> total;
  total.fill(0.0f);
  int64_t p = start;
  for (; p < end && sorted_keys[p] == key; ++p) {
    const auto values = to_float(*reinterpret_cast<const Load*>(grad + order[p] * dim + column));
#pragma unroll
    for (int k = 0; k < kVec; ++k) total[k] += values[k];
  }
  if (run_start && !run_continues(sorted_keys, p, key, tokens)) {  // the whole run
    store_row<T, kVec>(grad_table + key * dim + column, total);
    return;
  }
  Partial partial;
  static_cast<cutlass::Array<float, kVec>&>(partial) = total;
  *reinterpret_cast<Partial*>(partials + (chunk * 2 + (run_start ? 1 : 0)) * dim + column) = partial;
}

// One block per chunk but the last: the run at the chunk's end, when it starts in this chunk and
// goes on into the next, gets its partials added in chunk order and its table row written.
template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads)
    table_grad_merge_kernel(const int64_t* __restrict__ sorted_keys, T* __restrict__ grad_table,
                            const float* __restrict__ partials, int64_t tokens, int64_t vocab,
                            int64_t dim) {
  using Partial = cutlass::AlignedArray<float, kVec>;
  const int64_t chunk = blockIdx.x;
  const int64_t last = min(tokens, (chunk + 1) * kTableGradChunk) - 1;
  const int64_t key = sorted_keys[last];
  const bool starts_here = chunk == 0 || sorted_keys[chunk * kTableGradChunk - 1] != key;
  if (key >= vocab || !starts_here || !run_continues(sorted_keys, last + 1, key, tokens)) return;
  const int64_t column = (static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x) * kVec;
  if (column >= dim) return;
  auto read = [&](int64_t row) {
    return static_cast<const cutlass::Array<float, kVec>&>(
        *reinterpret_cast<const Partial*>(partials + row * dim + column));
  };
  cutlass::Array<float, kVec> total = read(chunk * 2 + 1);
  int64_t next = chunk + 1;
  do {  // the ids are sorted: the run covers every chunk up to the one where it ends
    const auto values = read(next * 2);
#pragma unroll
    for (int k = 0; k < kVec; ++k) total[k] += values[k];
    ++next;
  } while (run_continues(sorted_keys, next * kTableGradChunk, key, tokens));
  store_row<T, kVec>(grad_table + key * dim + column, total);
}

template <typename Launch>
cudaError_t with_vector_bytes(int bytes, Launch&& launch) {
  switch (bytes) {
    case 16: launch(std::integral_constant<int, 16>()); break;
    case 8: launch(std::integral_constant<int, 8>()); break;
    case 4: launch(std::integral_constant<int, 4>()); break;
    case 2: launch(std::integral_constant<int, 2>()); break;
    default: launch(std::integral_constant<int, 1>()); break;
  }
  return cudaGetLastError();
}

template <typename T, int kVec>
cudaError_t launch_table_grad(const T* grad, const int64_t* sorted_keys, const int64_t* order,
                              T* grad_table, float* partials, int64_t tokens, int64_t vocab,
                              int64_t dim, cudaStream_t stream) {
  const auto column_blocks = static_cast<unsigned>((dim + kThreads * kVec - 1) / (kThreads * kVec));
  table_grad_kernel<T, kVec><<<dim3(static_cast<unsigned>(tokens), column_blocks), kThreads, 0, stream>>>(
      grad, sorted_keys, order, grad_table, partials, tokens, vocab, dim);
  const int64_t chunks = (tokens + kTableGradChunk - 1) / kTableGradChunk;
  if (chunks > 1) {
    table_grad_merge_kernel<T, kVec><<<dim3(static_cast<unsigned>(chunks - 1), column_blocks), kThreads, 0, stream>>>(
        sorted_keys, grad_table, partials, tokens, vocab, dim);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t table_grad(const void* grad, const int64_t* sorted_keys, const int64_t* order,
                       void* grad_table, float* partials, int64_t tokens, int64_t vocab,
                       int64_t dim, cudaStream_t stream) {
  constexpr int kFull = 16 / static_cast<int>(sizeof(T));
  const bool vectorized = dim % kFull == 0 && vector_bytes({reinterpret_cast<uint64_t>(grad),
                                                            reinterpret_cast<uint64_t>(grad_table)}) == 16;
  const T* g = static_cast<const T*>(grad);
  T* table = static_cast<T*>(grad_table);
  if (vectorized) {
    return launch_table_grad<T, kFull>(g, sorted_keys, order, table, partials, tokens, vocab, dim, stream);
  }
  return launch_table_grad<T, 1>(g, sorted_keys, order, table, partials, tokens, vocab, dim, stream);
}

}  // namespace

cudaError_t multimodal_embed_forward(const int64_t* ids, const int32_t* image_index,
                                     const void* table, int64_t table_row_stride,
                                     const void* images, int64_t images_row_stride, void* out,
                                     int64_t tokens, int64_t vocab, int64_t num_images,
                                     int64_t dim, int64_t image_token_id, int element_bytes,
                                     cudaStream_t stream) {
  if (tokens == 0 || dim == 0) return cudaSuccess;
  const int64_t row_bytes = dim * element_bytes;
  const int64_t table_stride = table_row_stride * element_bytes;
  const int64_t images_stride = images_row_stride * element_bytes;
  const int bytes = vector_bytes({static_cast<uint64_t>(row_bytes), static_cast<uint64_t>(table_stride),
                                  static_cast<uint64_t>(images_stride), reinterpret_cast<uint64_t>(table),
                                  reinterpret_cast<uint64_t>(images), reinterpret_cast<uint64_t>(out)});
  return with_vector_bytes(bytes, [&](auto width) {
    embed_rows_kernel<decltype(width)::value><<<static_cast<unsigned>(tokens), kThreads, 0, stream>>>(
        ids, image_index, static_cast<const uint8_t*>(table), table_stride,
        static_cast<const uint8_t*>(images), images_stride, static_cast<uint8_t*>(out), vocab,
        num_images, row_bytes, image_token_id);
  });
}

cudaError_t multimodal_embed_image_grad(const void* grad, const int64_t* positions,
                                        void* grad_images, int64_t num_images, int64_t dim,
                                        int element_bytes, cudaStream_t stream) {
  if (num_images == 0 || dim == 0) return cudaSuccess;
  const int64_t row_bytes = dim * element_bytes;
  const int bytes = vector_bytes({static_cast<uint64_t>(row_bytes), reinterpret_cast<uint64_t>(grad),
                                  reinterpret_cast<uint64_t>(grad_images)});
  return with_vector_bytes(bytes, [&](auto width) {
    gather_rows_kernel<decltype(width)::value><<<static_cast<unsigned>(num_images), kThreads, 0, stream>>>(
        static_cast<const uint8_t*>(grad), positions, static_cast<uint8_t*>(grad_images), row_bytes);
  });
}

cudaError_t multimodal_embed_table_grad(const void* grad, const int64_t* sorted_keys,
                                        const int64_t* order, void* grad_table, float* partials,
                                        int64_t tokens, int64_t vocab, int64_t dim,
                                        ScalarKind kind, cudaStream_t stream) {
  if (tokens == 0 || dim == 0) return cudaSuccess;
  switch (kind) {
    case ScalarKind::Float16:
      return table_grad<cutlass::half_t>(grad, sorted_keys, order, grad_table, partials, tokens, vocab, dim, stream);
    case ScalarKind::BFloat16:
      return table_grad<cutlass::bfloat16_t>(grad, sorted_keys, order, grad_table, partials, tokens, vocab, dim,
                                             stream);
    default:
      return table_grad<float>(grad, sorted_keys, order, grad_table, partials, tokens, vocab, dim, stream);
  }
}

}  // namespace nvlm::cuda
