// CUDA pixel shuffle fused with LayerNorm, forward and backward.
//
// Forward: one 512-thread block per output row (width D = s*s*C <= 16384). Each thread gathers up
// to 32 elements of the row from the input segments with 16-byte loads (kVec elements converted
// to fp32 by CUTLASS's NumericArrayConverter), the block reduces mean and then variance from
// registers (two-pass, no cancellation), and each thread writes its normalized elements once.
//
// Backward: with xhat = (x - mean) * rstd and g = dy * weight,
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), scattered back through the shuffle.
// One block per SM walks a contiguous range of rows; each thread owns the same columns in every
// row, so it accumulates dweight = sum(dy * xhat) and dbias = sum(dy) for them without any
// synchronization inside the row loop: in shared memory (2 x D fp32 rounded up to whole vectors of
// the block: 128 KB at D = 12800) where the card allows that much per block, else directly in the
// block's partial row in global memory (L2-resident). A second kernel adds the partial rows in
// block order: deterministic. In shared memory the accumulators are laid out by (vector, element
// of the vector, thread), so that at each step a warp's 32 threads add into 32 consecutive floats,
// one per bank; by column (each thread's kVec = 8 bf16 columns side by side) 8 threads shared
// every bank, an 8-way conflict on each of the 16 read-modify-writes per vector.
#include <cutlass/array.h>
#include <cutlass/numeric_conversion.h>
#include <cutlass/numeric_types.h>

#include "device_utils.cuh"
#include "kernels.h"

namespace nvlm::cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kElementsPerThread = static_cast<int>(kMaxLayerNormWidth / kThreads);  // 32

template <typename T, int kVec>
struct Row {
  static constexpr int kVectors = kElementsPerThread / kVec;  // vectors per thread
  using Load = cutlass::AlignedArray<T, kVec>;
  using Frag = cutlass::Array<float, kVec>;

  // Element index within the row of this thread's vector v (kVec never straddles a segment,
  // since kVec divides C).
  __device__ static int64_t index(int v) {
    return (static_cast<int64_t>(v) * kThreads + threadIdx.x) * kVec;
  }
  __device__ static Frag load(const T* p) {
    return cutlass::NumericArrayConverter<float, T, kVec>()(*reinterpret_cast<const Load*>(p));
  }
  __device__ static void store(T* p, const Frag& f) {
    Load converted;  // aligned, so that the store below is one 16-byte access
    static_cast<cutlass::Array<T, kVec>&>(converted) =
        cutlass::NumericArrayConverter<T, float, kVec>()(f);
    *reinterpret_cast<Load*>(p) = converted;
  }
};

template <typename T, int kVec>
// (kThreads, 1): let ptxas use up to 128 registers; the row lives in registers
__global__ void __launch_bounds__(kThreads, 1)
    forward_kernel(const T* __restrict__ x, const T* __restrict__ weight,
                   const T* __restrict__ bias, T* __restrict__ out, float* __restrict__ mean_out,
                   float* __restrict__ rstd_out, Shuffle s, float eps) {
  using R = Row<T, kVec>;
  const int64_t row = blockIdx.x;
  const int64_t width = s.channels * s.scale * s.scale;
  typename R::Frag values[R::kVectors];
  float sum = 0.0f;
#pragma unroll
  for (int v = 0; v < R::kVectors; ++v) {
    const int64_t i = R::index(v);
    values[v].fill(0.0f);
    if (i < width) {
      values[v] = R::load(x + segment_offset(row, i / s.channels, s) + i % s.channels);
#pragma unroll
      for (int k = 0; k < kVec; ++k) sum += values[v][k];
    }
  }
  const float mean = block_sum<kThreads>(sum) / static_cast<float>(width);
  float squares = 0.0f;
#pragma unroll
  for (int v = 0; v < R::kVectors; ++v) {
    if (R::index(v) < width) {
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const float d = values[v][k] - mean;
        squares += d * d;
      }
    }
  }
  const float rstd = rsqrtf(block_sum<kThreads>(squares) / static_cast<float>(width) + eps);
#pragma unroll
  for (int v = 0; v < R::kVectors; ++v) {
    const int64_t i = R::index(v);
    if (i < width) {
      const typename R::Frag w = R::load(weight + i), b = R::load(bias + i);
      typename R::Frag y;
#pragma unroll
      for (int k = 0; k < kVec; ++k) y[k] = (values[v][k] - mean) * rstd * w[k] + b[k];
      R::store(out + row * width + i, y);
    }
  }
  if (threadIdx.x == 0) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

// Shared accumulator floats per block for one of dweight/dbias: every (vector, element, thread)
// slot a row of `width` columns uses (R::index runs over whole vectors of the block).
template <int kVec>
__host__ __device__ int64_t shared_accumulator_slots(int64_t width) {
  const int64_t per_vector = static_cast<int64_t>(kThreads) * kVec;
  return (width + per_vector - 1) / per_vector * per_vector;
}

template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads, 1)
    backward_kernel(const T* __restrict__ grad, const T* __restrict__ x,
                    const T* __restrict__ weight, const float* __restrict__ mean,
                    const float* __restrict__ rstd, T* __restrict__ grad_x,
                    float* __restrict__ partial_weight, float* __restrict__ partial_bias,
                    int64_t rows, int64_t rows_per_block, Shuffle s, bool shared_accumulators) {
  using R = Row<T, kVec>;
  extern __shared__ float shared[];  // [slots] dweight, then [slots] dbias, when they fit
  const int64_t width = s.channels * s.scale * s.scale;
  const int64_t slots = shared_accumulator_slots<kVec>(width);
  float* acc_weight = shared_accumulators ? shared : partial_weight + blockIdx.x * width;
  float* acc_bias = shared_accumulators ? shared + slots : partial_bias + blockIdx.x * width;
  // Where element k of this thread's vector v (row column i + k) accumulates: by slot in shared
  // memory (bank-conflict free, see the top of the file), by column in the global partial row.
  // (kVec = 1, the unaligned fallback: consecutive threads own consecutive columns already.)
  auto at = [&](int v, int k, int64_t i) -> int64_t {
    if constexpr (kVec > 1) {
      if (shared_accumulators) return (static_cast<int64_t>(v) * kVec + k) * kThreads + threadIdx.x;
    }
    return i + k;
  };
  const int64_t extent = shared_accumulators ? slots : width;
  for (int64_t j = threadIdx.x; j < extent; j += kThreads) acc_weight[j] = acc_bias[j] = 0.0f;
  // The zeroing strides over the accumulators differently from the accumulation (each thread
  // adds only into its own slots or columns), hence the barrier.
  __syncthreads();
  const int64_t first = blockIdx.x * rows_per_block;
  const int64_t last = first + rows_per_block < rows ? first + rows_per_block : rows;
  for (int64_t row = first; row < last; ++row) {
    const float mu = mean[row], rs = rstd[row];
    typename R::Frag xhat[R::kVectors], dy[R::kVectors];
    float g_sum = 0.0f, gx_sum = 0.0f;
#pragma unroll
    for (int v = 0; v < R::kVectors; ++v) {
      const int64_t i = R::index(v);
      xhat[v].fill(0.0f);
      dy[v].fill(0.0f);
      if (i < width) {
        xhat[v] = R::load(x + segment_offset(row, i / s.channels, s) + i % s.channels);
        dy[v] = R::load(grad + row * width + i);
        const typename R::Frag w = R::load(weight + i);
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          xhat[v][k] = (xhat[v][k] - mu) * rs;
          const float g = dy[v][k] * w[k];
          g_sum += g;
          gx_sum += g * xhat[v][k];
        }
      }
    }
    const float g_mean = block_sum<kThreads>(g_sum) / static_cast<float>(width);
    const float gx_mean = block_sum<kThreads>(gx_sum) / static_cast<float>(width);
#pragma unroll
    for (int v = 0; v < R::kVectors; ++v) {
      const int64_t i = R::index(v);
      if (i < width) {
        const typename R::Frag w = R::load(weight + i);
        typename R::Frag dx;
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          dx[k] = rs * (dy[v][k] * w[k] - g_mean - xhat[v][k] * gx_mean);
          acc_weight[at(v, k, i)] += dy[v][k] * xhat[v][k];
          acc_bias[at(v, k, i)] += dy[v][k];
        }
        R::store(grad_x + segment_offset(row, i / s.channels, s) + i % s.channels, dx);
      }
    }
  }
  if (shared_accumulators) {  // each thread copies its own slots to their columns
    for (int v = 0; v < R::kVectors; ++v) {
      const int64_t i = R::index(v);
      if (i < width) {
        for (int k = 0; k < kVec; ++k) {
          partial_weight[blockIdx.x * width + i + k] = acc_weight[at(v, k, i)];
          partial_bias[blockIdx.x * width + i + k] = acc_bias[at(v, k, i)];
        }
      }
    }
  }
}

template <typename T>
__global__ void sum_partials_kernel(const float* __restrict__ partial_weight,
                                    const float* __restrict__ partial_bias,
                                    T* __restrict__ grad_weight, T* __restrict__ grad_bias,
                                    int blocks, int64_t width) {
  const int64_t column = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (column >= width) return;
  float total_weight = 0.0f, total_bias = 0.0f;
  for (int b = 0; b < blocks; ++b) {  // block order: deterministic
    total_weight += partial_weight[b * width + column];
    total_bias += partial_bias[b * width + column];
  }
  grad_weight[column] = T(total_weight);
  grad_bias[column] = T(total_bias);
}

template <typename T>
constexpr int full_vector() { return 16 / static_cast<int>(sizeof(T)); }

// Vector width: 16 bytes when C and every pointer allow it, else one element per access.
template <typename T>
bool vectorizable(const Shuffle& s, std::initializer_list<const void*> pointers) {
  uint64_t values[8];
  int n = 0;
  for (const void* p : pointers) values[n++] = reinterpret_cast<uint64_t>(p);
  bool aligned = s.channels % full_vector<T>() == 0;
  for (int i = 0; i < n; ++i) aligned = aligned && values[i] % 16 == 0;
  return aligned;
}

template <typename T>
cudaError_t forward(const void* x, const void* weight, const void* bias, void* out, float* mean,
                    float* rstd, const Shuffle& s, float eps, cudaStream_t stream) {
  const auto rows = static_cast<unsigned>(shuffle_rows(s));
  const T* xt = static_cast<const T*>(x);
  const T* wt = static_cast<const T*>(weight);
  const T* bt = static_cast<const T*>(bias);
  T* ot = static_cast<T*>(out);
  if (vectorizable<T>(s, {x, weight, bias, out})) {
    forward_kernel<T, full_vector<T>()><<<rows, kThreads, 0, stream>>>(xt, wt, bt, ot, mean, rstd, s, eps);
  } else {
    forward_kernel<T, 1><<<rows, kThreads, 0, stream>>>(xt, wt, bt, ot, mean, rstd, s, eps);
  }
  return cudaGetLastError();
}

template <typename T, int kVec>
cudaError_t launch_backward(const T* grad, const T* x, const T* weight, const float* mean,
                            const float* rstd, T* grad_x, float* partial_weight,
                            float* partial_bias, int blocks, int shared_memory_limit,
                            int64_t rows, int64_t rows_per_block, const Shuffle& s,
                            cudaStream_t stream) {
  const int64_t width = s.channels * s.scale * s.scale;
  const int64_t wanted = 2 * shared_accumulator_slots<kVec>(width) *
                         static_cast<int64_t>(sizeof(float));  // <= 128 KB
  const bool shared_accumulators = wanted <= shared_memory_limit;
  const size_t shared = shared_accumulators ? static_cast<size_t>(wanted) : 0;
  auto kernel = backward_kernel<T, kVec>;
  if (shared_accumulators) {
    const cudaError_t status = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared));
    if (status != cudaSuccess) return status;
  }
  kernel<<<blocks, kThreads, shared, stream>>>(grad, x, weight, mean, rstd, grad_x,
                                               partial_weight, partial_bias, rows,
                                               rows_per_block, s, shared_accumulators);
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward(const void* grad_out, const void* x, const void* weight, const float* mean,
                     const float* rstd, void* grad_x, void* grad_weight, void* grad_bias,
                     float* partial_weight, float* partial_bias, int blocks,
                     int shared_memory_limit, const Shuffle& s, cudaStream_t stream) {
  const int64_t rows = shuffle_rows(s);
  const int64_t width = s.channels * s.scale * s.scale;
  const int64_t rows_per_block = (rows + blocks - 1) / blocks;
  const T* g = static_cast<const T*>(grad_out);
  const T* xt = static_cast<const T*>(x);
  const T* wt = static_cast<const T*>(weight);
  T* gx = static_cast<T*>(grad_x);
  cudaError_t status =
      vectorizable<T>(s, {grad_out, x, weight, grad_x})
          ? launch_backward<T, full_vector<T>()>(g, xt, wt, mean, rstd, gx, partial_weight,
                                                 partial_bias, blocks, shared_memory_limit, rows,
                                                 rows_per_block, s, stream)
          : launch_backward<T, 1>(g, xt, wt, mean, rstd, gx, partial_weight, partial_bias,
                                  blocks, shared_memory_limit, rows, rows_per_block, s, stream);
  if (status != cudaSuccess) return status;
  const unsigned column_blocks = static_cast<unsigned>((width + 255) / 256);
  sum_partials_kernel<T><<<column_blocks, 256, 0, stream>>>(
      partial_weight, partial_bias, static_cast<T*>(grad_weight), static_cast<T*>(grad_bias),
      blocks, width);
  return cudaGetLastError();
}

}  // namespace

int pixel_shuffle_layernorm_backward_blocks(int64_t rows, int multiprocessors) {
  // 512 threads x ~100 registers and up to 128 KB of accumulators: one block per SM
  const int64_t blocks = rows < multiprocessors ? rows : multiprocessors;
  return static_cast<int>(blocks > 0 ? blocks : 1);
}

cudaError_t pixel_shuffle_layernorm_forward(const void* x, const void* weight, const void* bias,
                                            void* out, float* mean, float* rstd,
                                            const Shuffle& s, float eps, ScalarKind kind,
                                            cudaStream_t stream) {
  if (shuffle_rows(s) == 0) return cudaSuccess;
  switch (kind) {
    case ScalarKind::Float16:
      return forward<cutlass::half_t>(x, weight, bias, out, mean, rstd, s, eps, stream);
    case ScalarKind::BFloat16:
      return forward<cutlass::bfloat16_t>(x, weight, bias, out, mean, rstd, s, eps, stream);
    default:
      return forward<float>(x, weight, bias, out, mean, rstd, s, eps, stream);
  }
}

cudaError_t pixel_shuffle_layernorm_backward(const void* grad_out, const void* x,
                                             const void* weight, const float* mean,
                                             const float* rstd, void* grad_x, void* grad_weight,
                                             void* grad_bias, float* partial_weight,
                                             float* partial_bias, int blocks,
                                             int shared_memory_limit, const Shuffle& s,
                                             ScalarKind kind, cudaStream_t stream) {
  switch (kind) {
    case ScalarKind::Float16:
      return backward<cutlass::half_t>(grad_out, x, weight, mean, rstd, grad_x, grad_weight,
                                       grad_bias, partial_weight, partial_bias, blocks,
                                       shared_memory_limit, s, stream);
    case ScalarKind::BFloat16:
      return backward<cutlass::bfloat16_t>(grad_out, x, weight, mean, rstd, grad_x, grad_weight,
                                           grad_bias, partial_weight, partial_bias, blocks,
                                           shared_memory_limit, s, stream);
    default:
      return backward<float>(grad_out, x, weight, mean, rstd, grad_x, grad_weight, grad_bias,
                             partial_weight, partial_bias, blocks, shared_memory_limit, s, stream);
  }
}

}  // namespace nvlm::cuda
