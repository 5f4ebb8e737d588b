// Helpers shared by the C++ (CPU and CUDA glue) implementations of the nvlm_kernels ops.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <cstring>
#include <limits>

namespace nvlm {

// NVLM_KERNELS_POISON=1 (set by the test suite) fills freshly allocated outputs with NaN, so a
// kernel that forgets to write part of its output fails the comparison instead of passing by luck
// on zero-filled pages. Read on each call so that tests can toggle it.
inline bool poison_outputs() {
  const char* value = std::getenv("NVLM_KERNELS_POISON");
  return value != nullptr && std::strcmp(value, "1") == 0;
}

inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
  if (poison_outputs() && at::isFloatingType(out.scalar_type())) {
    out.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  return out;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Geometry of a pixel shuffle: x (N, grid_h*grid_w, C) folded scale x scale into channels.
// Output token (r, c) on the (grid_h/scale) x (grid_w/scale) grid holds, in this order, the C
// channels of input patches (scale*r + i, scale*c + j) for i, j in [0, scale), i-major: for
// scale 2 that is top-left | top-right | bottom-left | bottom-right (NVLM "v2", docs/nvlm.md section 4).
struct ShuffleGeometry {
  int64_t batch, grid_h, grid_w, channels, scale;

  int64_t out_h() const { return grid_h / scale; }
  int64_t out_w() const { return grid_w / scale; }
  int64_t out_tokens() const { return out_h() * out_w(); }
  int64_t rows() const { return batch * out_tokens(); }       // output rows
  int64_t row_width() const { return channels * scale * scale; }  // output channels

  // Offset (in elements) of the input segment that fills part `k` (0 <= k < scale^2) of output
  // row `row`; each segment is `channels` contiguous elements of a contiguous x.
  int64_t input_offset(int64_t row, int64_t k) const {
    const int64_t n = row / out_tokens();
    const int64_t token = row % out_tokens();
    const int64_t r = token / out_w(), c = token % out_w();
    const int64_t i = k / scale, j = k % scale;
    return ((n * grid_h + scale * r + i) * grid_w + scale * c + j) * channels;
  }
};

inline ShuffleGeometry check_shuffle_geometry(const at::Tensor& x, int64_t scale, int64_t grid_h,
                                              int64_t grid_w) {
  TORCH_CHECK(x.dim() == 3, "x must be (N, L, C), got ", x.dim(), " dims");
  TORCH_CHECK(scale >= 1, "scale must be >= 1, got ", scale);
  TORCH_CHECK(grid_h >= 1 && grid_w >= 1, "grid must be positive, got ", grid_h, "x", grid_w);
  TORCH_CHECK(x.size(2) >= 1, "x must have at least one channel");
  TORCH_CHECK(grid_h * grid_w == x.size(1), "grid ", grid_h, "x", grid_w,
              " does not cover L = ", x.size(1));
  TORCH_CHECK(grid_h % scale == 0 && grid_w % scale == 0, "grid ", grid_h, "x", grid_w,
              " is not divisible by scale ", scale);
  return ShuffleGeometry{x.size(0), grid_h, grid_w, x.size(2), scale};
}

}  // namespace nvlm
