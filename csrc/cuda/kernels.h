// Launchers of the CUDA kernels, callable without torch: raw pointers, sizes, a stream.
//
// The .cu files that define them include only CUDA and CUTLASS headers, so every kernel can be
// compile-checked with plain nvcc (python -m nvlm_kernels.compile_gate); the torch glue that
// validates tensors and calls them lives in ops_cuda.cpp.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace nvlm::cuda {

enum class ScalarKind { Float16, BFloat16, Float32 };

// Geometry of a pixel shuffle of x (N, grid_h * grid_w, C) into (N, (grid_h/s)*(grid_w/s), s*s*C).
struct Shuffle {
  int64_t batch;
  int64_t grid_h, grid_w;
  int64_t channels;
  int64_t scale;
};

// out[row] = concat over parts k of x segment (row, k); `inverse` copies the other way (the
// backward). Element size in bytes: the copy is dtype-agnostic.
cudaError_t pixel_shuffle(const void* src, void* dst, const Shuffle& shuffle, int element_bytes,
                          bool inverse, cudaStream_t stream);

// Widest output row (s*s*C elements) that the pixel_shuffle_layernorm kernels keep in registers.
constexpr int64_t kMaxLayerNormWidth = 16384;

cudaError_t pixel_shuffle_layernorm_forward(const void* x, const void* weight, const void* bias,
                                            void* out, float* mean, float* rstd,
                                            const Shuffle& shuffle, float eps, ScalarKind kind,
                                            cudaStream_t stream);

// partial_weight / partial_bias: (blocks, s*s*C) fp32 scratch; blocks from
// pixel_shuffle_layernorm_backward_blocks. The per-block dweight/dbias accumulators live in
// shared memory when 2 * s*s*C * 4 bytes fit `shared_memory_limit` (the device's opt-in limit per
// block: 227 KB on H100, 163 KB on A100, 99 KB on Ada), else in the partial rows in global memory.
int pixel_shuffle_layernorm_backward_blocks(int64_t rows, int multiprocessors);
cudaError_t pixel_shuffle_layernorm_backward(const void* grad_out, const void* x,
                                             const void* weight, const float* mean,
                                             const float* rstd, void* grad_x, void* grad_weight,
                                             void* grad_bias, float* partial_weight,
                                             float* partial_bias, int blocks,
                                             int shared_memory_limit, const Shuffle& shuffle,
                                             ScalarKind kind,
                                             cudaStream_t stream);

// ids: int64 token ids (tokens,); image_index: running placeholder count - 1 per token.
cudaError_t multimodal_embed_forward(const int64_t* ids, const int32_t* image_index,
                                     const void* table, int64_t table_row_stride,
                                     const void* images, int64_t images_row_stride, void* out,
                                     int64_t tokens, int64_t vocab, int64_t num_images,
                                     int64_t dim, int64_t image_token_id, int element_bytes,
                                     cudaStream_t stream);

// grad_images[m] = grad[positions[m]] (zero row where positions[m] < 0).
cudaError_t multimodal_embed_image_grad(const void* grad, const int64_t* positions,
                                        void* grad_images, int64_t num_images, int64_t dim,
                                        int element_bytes, cudaStream_t stream);

// grad_table[key] = sum of grad rows over each run of equal sorted keys (keys == vocab skipped),
// in position order; grad_table must be zeroed by the caller. Runs are summed in pieces of at
// most kTableGradChunk positions; partials is fp32 scratch of table_grad_partials_rows(tokens)
// x dim elements.
constexpr int64_t kTableGradChunk = 64;
inline int64_t table_grad_partials_rows(int64_t tokens) {
  return 2 * ((tokens + kTableGradChunk - 1) / kTableGradChunk);
}
cudaError_t multimodal_embed_table_grad(const void* grad, const int64_t* sorted_keys,
                                        const int64_t* order, void* grad_table, float* partials,
                                        int64_t tokens, int64_t vocab, int64_t dim,
                                        ScalarKind kind, cudaStream_t stream);

}  // namespace nvlm::cuda
