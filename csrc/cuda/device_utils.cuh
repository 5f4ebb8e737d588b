// Device helpers shared by the .cu files: pixel-shuffle geometry, block reductions, and the
// widest vector access that the pointers and row sizes allow.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <initializer_list>

#include "kernels.h"

namespace nvlm::cuda {

// Element offset, in a contiguous x (N, grid_h*grid_w, C), of segment `part` of output `row`:
// input patch (s*r + i, s*c + j) of output token (r, c), part = i*s + j (NVLM "v2" order).
__host__ __device__ inline int64_t segment_offset(int64_t row, int64_t part, const Shuffle& s) {
  const int64_t out_w = s.grid_w / s.scale;
  const int64_t out_tokens = (s.grid_h / s.scale) * out_w;
  const int64_t n = row / out_tokens, token = row % out_tokens;
  const int64_t r = token / out_w, c = token % out_w;
  const int64_t i = part / s.scale, j = part % s.scale;
  return ((n * s.grid_h + s.scale * r + i) * s.grid_w + s.scale * c + j) * s.channels;
}

inline int64_t shuffle_rows(const Shuffle& s) {
  return s.batch * (s.grid_h / s.scale) * (s.grid_w / s.scale);
}

// Largest power-of-two access width (bytes, <= 16) dividing every value given: row sizes in
// bytes and pointer addresses.
inline int vector_bytes(std::initializer_list<uint64_t> values) {
  int bytes = 16;
  for (uint64_t v : values) {
    while (bytes > 1 && v % bytes != 0) bytes /= 2;
  }
  return bytes;
}

template <int kThreads>
__device__ inline float block_sum(float value) {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "whole warps, one block");
  __shared__ float warp_sums[kThreads / 32];
  __shared__ float total;
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffff, value, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_sums[warp] = value;
  __syncthreads();
  if (warp == 0) {
    value = lane < kThreads / 32 ? warp_sums[lane] : 0.0f;
    for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffff, value, offset);
    if (lane == 0) total = value;
  }
  __syncthreads();
  const float result = total;
  __syncthreads();  // the shared slots are reused by the next call
  return result;
}

}  // namespace nvlm::cuda
