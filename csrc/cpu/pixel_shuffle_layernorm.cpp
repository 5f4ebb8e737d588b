// CPU implementation of nvlm_kernels::pixel_shuffle_layernorm and its backward.
//
// One pass over the data each way: every output row (one token of the shuffled grid, width
// D = C * scale^2) is assembled from scale^2 contiguous input segments of C channels, normalized
// with statistics in the op-math type (float32 for fp16/bf16/fp32, float64 for float64), and
// written once. Eager PyTorch makes four passes (permute copy read+write, layer_norm read+write).
// Rows are independent, so both directions parallelize over rows with at::parallel_for.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "common.h"

namespace nvlm {
namespace {

// Independent partial sums per reduction: a single running sum is a serial dependency chain that
// the compiler may not reorder, while kLanes independent sums vectorize (SSE/AVX lanes).
constexpr int64_t kLanes = 16;

template <typename T, typename A>
A sum_segment(const T* p, int64_t n) {
  A lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += static_cast<A>(p[i + l]);
  }
  A total = 0;
  for (int64_t l = 0; l < kLanes; ++l) total += lanes[l];
  for (; i < n; ++i) total += static_cast<A>(p[i]);
  return total;
}

// Sum of squared deviations from `mean`: the second pass of a two-pass variance, which (unlike
// E[x^2] - E[x]^2) does not cancel catastrophically when |mean| >> std.
template <typename T, typename A>
A sum_sq_dev_segment(const T* p, int64_t n, A mean) {
  A lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      const A d = static_cast<A>(p[i + l]) - mean;
      lanes[l] += d * d;
    }
  }
  A total = 0;
  for (int64_t l = 0; l < kLanes; ++l) total += lanes[l];
  for (; i < n; ++i) {
    const A d = static_cast<A>(p[i]) - mean;
    total += d * d;
  }
  return total;
}

template <typename T>
void forward_rows(const T* x, const T* weight, const T* bias, T* out, at::opmath_type<T>* mean,
                  at::opmath_type<T>* rstd, const ShuffleGeometry& g, double eps) {
  using A = at::opmath_type<T>;
  const int64_t C = g.channels, D = g.row_width(), parts = g.scale * g.scale;
  // ~32K elements per task keeps the scheduling overhead small against the memory traffic.
  const int64_t grain = std::max<int64_t>(1, 32768 / D);
  at::parallel_for(0, g.rows(), grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      A sum = 0;
      for (int64_t k = 0; k < parts; ++k) sum += sum_segment<T, A>(x + g.input_offset(row, k), C);
      const A mu = sum / static_cast<A>(D);
      A sq = 0;
      for (int64_t k = 0; k < parts; ++k) {
        sq += sum_sq_dev_segment<T, A>(x + g.input_offset(row, k), C, mu);
      }
      const A rs = A(1) / std::sqrt(sq / static_cast<A>(D) + static_cast<A>(eps));
      T* dst_row = out + row * D;
      for (int64_t k = 0; k < parts; ++k) {
        const T* src = x + g.input_offset(row, k);
        const T* w = weight + k * C;
        const T* b = bias + k * C;
        T* dst = dst_row + k * C;
        for (int64_t c = 0; c < C; ++c) {
          const A xhat = (static_cast<A>(src[c]) - mu) * rs;
          dst[c] = static_cast<T>(xhat * static_cast<A>(w[c]) + static_cast<A>(b[c]));
        }
      }
      mean[row] = mu;
      rstd[row] = rs;
    }
  });
}

// One output row of the backward. With xhat = (x - mean) * rstd and g = dy * weight:
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),  scattered back through the inverse shuffle;
//   dweight += dy * xhat and dbias += dy into this chunk's partial sums.
template <typename T, typename A>
void backward_row(const T* dy_row, const T* x, const T* weight, A mu, A rs, T* dx,
                  A* partial_weight, A* partial_bias, int64_t row, const ShuffleGeometry& g) {
  const int64_t C = g.channels, D = g.row_width(), parts = g.scale * g.scale;
  A g_lanes[kLanes] = {}, gx_lanes[kLanes] = {};
  for (int64_t k = 0; k < parts; ++k) {
    const T* src = x + g.input_offset(row, k);
    const T* dy = dy_row + k * C;
    const T* w = weight + k * C;
    A* pw = partial_weight + k * C;
    A* pb = partial_bias + k * C;
    int64_t c = 0;
    for (; c + kLanes <= C; c += kLanes) {
      for (int64_t l = 0; l < kLanes; ++l) {
        const A xhat = (static_cast<A>(src[c + l]) - mu) * rs;
        const A dyv = static_cast<A>(dy[c + l]);
        const A gy = dyv * static_cast<A>(w[c + l]);
        g_lanes[l] += gy;
        gx_lanes[l] += gy * xhat;
        pw[c + l] += dyv * xhat;
        pb[c + l] += dyv;
      }
    }
    for (; c < C; ++c) {
      const A xhat = (static_cast<A>(src[c]) - mu) * rs;
      const A dyv = static_cast<A>(dy[c]);
      const A gy = dyv * static_cast<A>(w[c]);
      g_lanes[0] += gy;
      gx_lanes[0] += gy * xhat;
      pw[c] += dyv * xhat;
      pb[c] += dyv;
    }
  }
  A g_sum = 0, gx_sum = 0;
  for (int64_t l = 0; l < kLanes; ++l) {
    g_sum += g_lanes[l];
    gx_sum += gx_lanes[l];
  }
  const A g_mean = g_sum / static_cast<A>(D), gx_mean = gx_sum / static_cast<A>(D);
  for (int64_t k = 0; k < parts; ++k) {
    const int64_t offset = g.input_offset(row, k);
    const T* src = x + offset;
    const T* dy = dy_row + k * C;
    const T* w = weight + k * C;
    T* dst = dx + offset;
    for (int64_t c = 0; c < C; ++c) {
      const A xhat = (static_cast<A>(src[c]) - mu) * rs;
      const A gy = static_cast<A>(dy[c]) * static_cast<A>(w[c]);
      dst[c] = static_cast<T>(rs * (gy - g_mean - xhat * gx_mean));
    }
  }
}

template <typename T>
void backward_rows(const T* dy, const T* x, const T* weight, const at::opmath_type<T>* mean,
                   const at::opmath_type<T>* rstd, T* dx, T* dweight, T* dbias,
                   const ShuffleGeometry& g) {
  using A = at::opmath_type<T>;
  const int64_t D = g.row_width(), rows = g.rows();
  // dweight/dbias: each chunk of rows sums into its own partial row, then the partials are added
  // in chunk order. The chunking depends only on the shape, never on the thread count, so the
  // result is bitwise deterministic. 64 chunks bound the scratch to 2 * 64 * D accumulators.
  const int64_t rows_per_chunk = std::max<int64_t>(8, ceil_div(rows, 64));
  const int64_t chunks = ceil_div(rows, rows_per_chunk);
  std::vector<A> partial_weight(static_cast<size_t>(chunks * D), A(0));
  std::vector<A> partial_bias(static_cast<size_t>(chunks * D), A(0));
  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      A* pw = partial_weight.data() + chunk * D;
      A* pb = partial_bias.data() + chunk * D;
      const int64_t row_end = std::min(rows, (chunk + 1) * rows_per_chunk);
      for (int64_t row = chunk * rows_per_chunk; row < row_end; ++row) {
        backward_row<T, A>(dy + row * D, x, weight, mean[row], rstd[row], dx, pw, pb, row, g);
      }
    }
  });
  at::parallel_for(0, D, 1024, [&](int64_t col_begin, int64_t col_end) {
    for (int64_t col = col_begin; col < col_end; ++col) {
      A w_total = 0, b_total = 0;
      for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        w_total += partial_weight[chunk * D + col];
        b_total += partial_bias[chunk * D + col];
      }
      dweight[col] = static_cast<T>(w_total);
      dbias[col] = static_cast<T>(b_total);
    }
  });
}

at::ScalarType stats_dtype(at::ScalarType x_dtype) {
  return x_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

void check_affine(const at::Tensor& t, const char* name, const at::Tensor& x, int64_t width) {
  TORCH_CHECK(t.numel() == width, name, " must have ", width, " elements, got ", t.numel());
  TORCH_CHECK(t.device() == x.device(), name, " is on ", t.device(), ", x on ", x.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), name, " dtype ", t.scalar_type(),
              " differs from x dtype ", x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pixel_shuffle_layernorm_cpu(
    const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& bias_in, double eps,
    int64_t scale, int64_t grid_h, int64_t grid_w) {
  const ShuffleGeometry g = check_shuffle_geometry(x_in, scale, grid_h, grid_w);
  check_affine(weight_in, "weight", x_in, g.row_width());
  check_affine(bias_in, "bias", x_in, g.row_width());
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous(),
                   bias = bias_in.contiguous();
  at::Tensor out = new_output({g.batch, g.out_tokens(), g.row_width()}, x.options());
  const auto stats_options = x.options().dtype(stats_dtype(x.scalar_type()));
  at::Tensor mean = new_output({g.batch, g.out_tokens()}, stats_options);
  at::Tensor rstd = new_output({g.batch, g.out_tokens()}, stats_options);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "pixel_shuffle_layernorm_cpu", [&] {
        using A = at::opmath_type<scalar_t>;
        forward_rows<scalar_t>(x.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
                               bias.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                               mean.mutable_data_ptr<A>(), rstd.mutable_data_ptr<A>(), g, eps);
      });
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pixel_shuffle_layernorm_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& weight_in,
    const at::Tensor& mean_in, const at::Tensor& rstd_in, int64_t scale, int64_t grid_h,
    int64_t grid_w) {
  const ShuffleGeometry g = check_shuffle_geometry(x_in, scale, grid_h, grid_w);
  check_affine(weight_in, "weight", x_in, g.row_width());
  TORCH_CHECK(grad_out_in.numel() == g.rows() * g.row_width(), "grad_out must have ",
              g.rows() * g.row_width(), " elements, got ", grad_out_in.numel());
  TORCH_CHECK(grad_out_in.scalar_type() == x_in.scalar_type(), "grad_out dtype ",
              grad_out_in.scalar_type(), " differs from x dtype ", x_in.scalar_type());
  const auto stats = stats_dtype(x_in.scalar_type());
  TORCH_CHECK(mean_in.numel() == g.rows() && rstd_in.numel() == g.rows(),
              "mean and rstd must have ", g.rows(), " elements");
  TORCH_CHECK(mean_in.scalar_type() == stats && rstd_in.scalar_type() == stats,
              "mean and rstd must be ", stats);
  TORCH_CHECK(grad_out_in.device() == x_in.device() && mean_in.device() == x_in.device() &&
                  rstd_in.device() == x_in.device(),
              "grad_out, mean and rstd must be on the device of x (", x_in.device(), ")");
  const at::Tensor grad_out = grad_out_in.contiguous(), x = x_in.contiguous(),
                   weight = weight_in.contiguous(), mean = mean_in.contiguous(),
                   rstd = rstd_in.contiguous();
  at::Tensor grad_x = new_output(x.sizes(), x.options());
  at::Tensor grad_weight = new_output(weight_in.sizes(), weight.options());
  at::Tensor grad_bias = new_output(weight_in.sizes(), weight.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "pixel_shuffle_layernorm_backward_cpu", [&] {
        using A = at::opmath_type<scalar_t>;
        backward_rows<scalar_t>(
            grad_out.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
            weight.const_data_ptr<scalar_t>(), mean.const_data_ptr<A>(), rstd.const_data_ptr<A>(),
            grad_x.mutable_data_ptr<scalar_t>(), grad_weight.mutable_data_ptr<scalar_t>(),
            grad_bias.mutable_data_ptr<scalar_t>(), g);
      });
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(nvlm_kernels, CPU, m) {
  m.impl("pixel_shuffle_layernorm", &pixel_shuffle_layernorm_cpu);
  m.impl("pixel_shuffle_layernorm_backward", &pixel_shuffle_layernorm_backward_cpu);
}

}  // namespace nvlm
