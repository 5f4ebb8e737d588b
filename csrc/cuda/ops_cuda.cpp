// Torch glue of the CUDA kernels: argument checks, output allocation, the current stream, and the
// device-side preparation (running counts, sorting) done with ATen ops, then the launchers of
// kernels.h. Registered for the CUDA dispatch key of the nvlm_kernels:: ops.
// Only c10/cuda headers: ATen/cuda/CUDAContext.h would pull in cuBLAS/cuSPARSE headers, which a
// CUDA toolkit without the math libraries (or pip's CUDA torch) may not have.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "common.h"
#include "cuda/kernels.h"

namespace nvlm {
namespace {

cuda::ScalarKind scalar_kind(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return cuda::ScalarKind::Float16;
    case at::kBFloat16: return cuda::ScalarKind::BFloat16;
    case at::kFloat: return cuda::ScalarKind::Float32;
    default: TORCH_CHECK(false, "the CUDA kernels take float16, bfloat16 or float32, got ", t.scalar_type());
  }
}

void check_cuda(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == like.device(), name, " is on ", t.device(), ", expected ", like.device());
}

// Grids are launched with one block per row, token or segment along x (at most 2^31 - 1).
void check_grid(int64_t blocks, const char* what) {
  TORCH_CHECK(blocks <= INT32_MAX, "too many ", what, " for one launch: ", blocks, " > ", INT32_MAX);
}

cuda::Shuffle shuffle_of(const at::Tensor& x, int64_t scale, int64_t grid_h, int64_t grid_w) {
  const ShuffleGeometry g = check_shuffle_geometry(x, scale, grid_h, grid_w);
  check_grid(g.rows() * scale * scale, "pixel-shuffle segments");
  return cuda::Shuffle{g.batch, g.grid_h, g.grid_w, g.channels, g.scale};
}

// ---------------------------------------------------------------------------------------------
// pixel shuffle

at::Tensor pixel_shuffle_cuda(const at::Tensor& x_in, int64_t scale, int64_t grid_h, int64_t grid_w) {
  check_cuda(x_in, "x", x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const cuda::Shuffle s = shuffle_of(x, scale, grid_h, grid_w);
  at::Tensor out = new_output({s.batch, (grid_h / scale) * (grid_w / scale), s.channels * scale * scale}, x.options());
  C10_CUDA_CHECK(cuda::pixel_shuffle(x.const_data_ptr(), out.mutable_data_ptr(), s,
                                     static_cast<int>(x.element_size()), false,
                                     c10::cuda::getCurrentCUDAStream()));
  return out;
}

at::Tensor pixel_unshuffle_cuda(const at::Tensor& grad_in, int64_t channels, int64_t scale,
                                int64_t grid_h, int64_t grid_w) {
  check_cuda(grad_in, "grad_out", grad_in);
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const at::Tensor grad = grad_in.contiguous();
  TORCH_CHECK(channels >= 1 && grad.size(-1) == channels * scale * scale,
              "grad_out must have C * scale^2 = ", channels * scale * scale, " channels");
  at::Tensor grad_x = new_output({grad.size(0), grid_h * grid_w, channels}, grad.options());
  const cuda::Shuffle s = shuffle_of(grad_x, scale, grid_h, grid_w);
  TORCH_CHECK(grad.numel() == grad_x.numel(), "grad_out has ", grad.numel(), " elements, expected ",
              grad_x.numel());
  C10_CUDA_CHECK(cuda::pixel_shuffle(grad.const_data_ptr(), grad_x.mutable_data_ptr(), s,
                                     static_cast<int>(grad.element_size()), true,
                                     c10::cuda::getCurrentCUDAStream()));
  return grad_x;
}

// ---------------------------------------------------------------------------------------------
// pixel shuffle + LayerNorm

cuda::Shuffle check_layernorm(const at::Tensor& x, const at::Tensor& weight, int64_t scale,
                              int64_t grid_h, int64_t grid_w) {
  check_cuda(x, "x", x);
  check_cuda(weight, "weight", x);
  const cuda::Shuffle s = shuffle_of(x, scale, grid_h, grid_w);
  const int64_t width = s.channels * scale * scale;
  TORCH_CHECK(width <= cuda::kMaxLayerNormWidth, "the CUDA pixel_shuffle_layernorm keeps a row of C * scale^2 = ",
              width, " elements in registers, at most ", cuda::kMaxLayerNormWidth,
              "; use the triton or torch backend");
  TORCH_CHECK(weight.numel() == width, "weight must have ", width, " elements, got ", weight.numel());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight dtype ", weight.scalar_type(),
              " differs from x dtype ", x.scalar_type());
  return s;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pixel_shuffle_layernorm_cuda(
    const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& bias_in, double eps,
    int64_t scale, int64_t grid_h, int64_t grid_w) {
  const cuda::Shuffle s = check_layernorm(x_in, weight_in, scale, grid_h, grid_w);
  check_cuda(bias_in, "bias", x_in);
  TORCH_CHECK(bias_in.numel() == weight_in.numel() && bias_in.scalar_type() == x_in.scalar_type(),
              "bias must match weight in size and x in dtype");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous(), bias = bias_in.contiguous();
  const int64_t tokens = (grid_h / scale) * (grid_w / scale);
  at::Tensor out = new_output({s.batch, tokens, s.channels * scale * scale}, x.options());
  at::Tensor mean = new_output({s.batch, tokens}, x.options().dtype(at::kFloat));
  at::Tensor rstd = new_output({s.batch, tokens}, x.options().dtype(at::kFloat));
  C10_CUDA_CHECK(cuda::pixel_shuffle_layernorm_forward(
      x.const_data_ptr(), weight.const_data_ptr(), bias.const_data_ptr(), out.mutable_data_ptr(),
      mean.mutable_data_ptr<float>(), rstd.mutable_data_ptr<float>(), s, static_cast<float>(eps),
      scalar_kind(x), c10::cuda::getCurrentCUDAStream()));
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pixel_shuffle_layernorm_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& weight_in,
    const at::Tensor& mean_in, const at::Tensor& rstd_in, int64_t scale, int64_t grid_h,
    int64_t grid_w) {
  const cuda::Shuffle s = check_layernorm(x_in, weight_in, scale, grid_h, grid_w);
  check_cuda(grad_in, "grad_out", x_in);
  check_cuda(mean_in, "mean", x_in);
  check_cuda(rstd_in, "rstd", x_in);
  const int64_t width = s.channels * scale * scale;
  const int64_t rows = s.batch * (grid_h / scale) * (grid_w / scale);
  TORCH_CHECK(grad_in.numel() == rows * width && grad_in.scalar_type() == x_in.scalar_type(),
              "grad_out must have ", rows * width, " elements of x's dtype");
  TORCH_CHECK(mean_in.numel() == rows && rstd_in.numel() == rows &&
                  mean_in.scalar_type() == at::kFloat && rstd_in.scalar_type() == at::kFloat,
              "mean and rstd must be float32 with ", rows, " elements");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor grad = grad_in.contiguous(), x = x_in.contiguous(), weight = weight_in.contiguous();
  const at::Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  at::Tensor grad_x = new_output(x.sizes(), x.options());
  at::Tensor grad_weight = new_output({width}, weight.options());
  at::Tensor grad_bias = new_output({width}, weight.options());
  int multiprocessors = 0, shared_memory_limit = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount,
                                        x.device().index()));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&shared_memory_limit,
                                        cudaDevAttrMaxSharedMemoryPerBlockOptin, x.device().index()));
  const int blocks = cuda::pixel_shuffle_layernorm_backward_blocks(rows, multiprocessors);
  at::Tensor partials = at::empty({2, blocks, width}, x.options().dtype(at::kFloat));
  C10_CUDA_CHECK(cuda::pixel_shuffle_layernorm_backward(
      grad.const_data_ptr(), x.const_data_ptr(), weight.const_data_ptr(), mean.const_data_ptr<float>(),
      rstd.const_data_ptr<float>(), grad_x.mutable_data_ptr(), grad_weight.mutable_data_ptr(),
      grad_bias.mutable_data_ptr(), partials[0].mutable_data_ptr<float>(),
      partials[1].mutable_data_ptr<float>(), blocks, shared_memory_limit, s, scalar_kind(x),
      c10::cuda::getCurrentCUDAStream()));
  return {grad_x, grad_weight, grad_bias};
}

// ---------------------------------------------------------------------------------------------
// multimodal embedding

at::Tensor unit_stride_rows(const at::Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); }

at::Tensor multimodal_embed_cuda(const at::Tensor& input_ids, const at::Tensor& embed_weight,
                                 const at::Tensor& image_embeds, int64_t image_token_id) {
  check_cuda(embed_weight, "embed_weight", embed_weight);
  check_cuda(input_ids, "input_ids", embed_weight);
  check_cuda(image_embeds, "image_embeds", embed_weight);
  TORCH_CHECK(input_ids.scalar_type() == at::kInt || input_ids.scalar_type() == at::kLong,
              "input_ids must be int32 or int64");
  TORCH_CHECK(embed_weight.dim() == 2 && image_embeds.dim() == 2 &&
                  embed_weight.size(1) == image_embeds.size(1) &&
                  embed_weight.scalar_type() == image_embeds.scalar_type(),
              "embed_weight (V, D) and image_embeds (M, D) must share D and dtype");
  const c10::cuda::CUDAGuard guard(embed_weight.device());
  const at::Tensor ids = input_ids.reshape(-1).to(at::kLong).contiguous();
  const at::Tensor table = unit_stride_rows(embed_weight), images = unit_stride_rows(image_embeds);
  const int64_t dim = table.size(1);
  std::vector<int64_t> sizes(input_ids.sizes().begin(), input_ids.sizes().end());
  sizes.push_back(dim);
  at::Tensor out = new_output(sizes, table.options());
  // running placeholder count on the device: no host sync
  check_grid(ids.numel(), "tokens");
  const at::Tensor image_index = at::cumsum(ids == image_token_id, 0, at::kInt) - 1;
  C10_CUDA_CHECK(cuda::multimodal_embed_forward(
      ids.const_data_ptr<int64_t>(), image_index.const_data_ptr<int32_t>(), table.const_data_ptr(),
      table.stride(0), images.const_data_ptr(), images.stride(0), out.mutable_data_ptr(), ids.numel(),
      table.size(0), images.size(0), dim, image_token_id, static_cast<int>(table.element_size()),
      c10::cuda::getCurrentCUDAStream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor> multimodal_embed_backward_cuda(const at::Tensor& grad_in,
                                                                  const at::Tensor& input_ids,
                                                                  int64_t vocab, int64_t num_images,
                                                                  int64_t image_token_id) {
  check_cuda(grad_in, "grad_out", grad_in);
  check_cuda(input_ids, "input_ids", grad_in);
  TORCH_CHECK(vocab >= 0 && num_images >= 0, "vocab and num_images must be >= 0");
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const at::Tensor ids = input_ids.reshape(-1).to(at::kLong).contiguous();
  const int64_t tokens = ids.numel(), dim = grad_in.size(-1);
  TORCH_CHECK(grad_in.numel() == tokens * dim, "grad_out must have ", tokens * dim, " elements");
  const at::Tensor grad = grad_in.reshape({tokens, dim}).contiguous();
  at::Tensor grad_table = at::zeros({vocab, dim}, grad.options());
  at::Tensor grad_images = new_output({num_images, dim}, grad.options());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor is_image = ids == image_token_id;
  if (num_images > 0 && dim > 0) {
    check_grid(num_images, "image rows");
    // positions[m] = token of the m-th placeholder, -1 if none; slot num_images takes any
    // placeholders beyond the image rows (unvalidated contents only)
    const at::Tensor image_index = at::cumsum(is_image, 0, at::kLong) - 1;
    at::Tensor positions = at::full({num_images + 1}, -1, ids.options());
    positions.scatter_(0, at::where(is_image, image_index.clamp_max(num_images), num_images),
                       at::arange(tokens, ids.options()));
    C10_CUDA_CHECK(cuda::multimodal_embed_image_grad(
        grad.const_data_ptr(), positions.const_data_ptr<int64_t>(), grad_images.mutable_data_ptr(),
        num_images, dim, static_cast<int>(grad.element_size()), stream));
  }
  if (tokens > 0 && vocab > 0 && dim > 0) {
    const at::Tensor no_table_grad = is_image.logical_or(ids < 0).logical_or(ids >= vocab);
    // the optional<bool> overload: a plain `true` would select sort(self, dim)
    const auto [sorted_keys, order] =
        at::sort(ids.masked_fill(no_table_grad, vocab), std::optional<bool>(true), 0, false);
    at::Tensor partials = at::empty({cuda::table_grad_partials_rows(tokens), dim}, grad.options().dtype(at::kFloat));
    C10_CUDA_CHECK(cuda::multimodal_embed_table_grad(
        grad.const_data_ptr(), sorted_keys.const_data_ptr<int64_t>(), order.const_data_ptr<int64_t>(),
        grad_table.mutable_data_ptr(), partials.mutable_data_ptr<float>(), tokens, vocab, dim,
        scalar_kind(grad), stream));
  }
  return {grad_table, grad_images};
}

}  // namespace

TORCH_LIBRARY_IMPL(nvlm_kernels, CUDA, m) {
  m.impl("pixel_shuffle", &pixel_shuffle_cuda);
  m.impl("pixel_unshuffle", &pixel_unshuffle_cuda);
  m.impl("pixel_shuffle_layernorm", &pixel_shuffle_layernorm_cuda);
  m.impl("pixel_shuffle_layernorm_backward", &pixel_shuffle_layernorm_backward_cuda);
  m.impl("multimodal_embed", &multimodal_embed_cuda);
  m.impl("multimodal_embed_backward", &multimodal_embed_backward_cuda);
}

}  // namespace nvlm
