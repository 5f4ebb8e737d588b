// Schemas of the nvlm_kernels:: custom ops and the Python module `nvlm_kernels._C`.
//
// Each op is defined once here; its CPU implementation lives in csrc/cpu/<op>.cpp and its CUDA
// implementation in csrc/cuda/<op>.{cu,cpp}. Fake (meta) and autograd registrations are in
// nvlm_kernels/_native.py, which is what the `native` backend calls.
#include <pybind11/pybind11.h>
#include <torch/library.h>

TORCH_LIBRARY(nvlm_kernels, m) {
  // x (N, grid_h*grid_w, C) -> (N, L/scale^2, C*scale^2), NVLM "v2" order; pixel_unshuffle is the
  // inverse permutation (the backward), with C given explicitly.
  m.def("pixel_shuffle(Tensor x, int scale, int grid_h, int grid_w) -> Tensor");
  m.def(
      "pixel_unshuffle(Tensor grad_out, int channels, int scale, int grid_h, int grid_w) -> "
      "Tensor");
  // x (N, grid_h*grid_w, C) -> out (N, L/scale^2, C*scale^2), mean and rstd (N, L/scale^2) in
  // float32 (float64 for float64 x), saved for the backward.
  m.def(
      "pixel_shuffle_layernorm(Tensor x, Tensor weight, Tensor bias, float eps, int scale, "
      "int grid_h, int grid_w) -> (Tensor out, Tensor mean, Tensor rstd)");
  m.def(
      "pixel_shuffle_layernorm_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor mean, "
      "Tensor rstd, int scale, int grid_h, int grid_w) -> (Tensor grad_x, Tensor grad_weight, "
      "Tensor grad_bias)");
  // input_ids (...) int32/int64, embed_weight (V, D), image_embeds (M, D) -> (..., D): table rows
  // at text ids, image rows in order at the image_token_id placeholders. The backward takes
  // vocab = 0 (num_images = 0) to skip the table (image) gradient.
  m.def(
      "multimodal_embed(Tensor input_ids, Tensor embed_weight, Tensor image_embeds, "
      "int image_token_id) -> Tensor");
  m.def(
      "multimodal_embed_backward(Tensor grad_out, Tensor input_ids, int vocab, int num_images, "
      "int image_token_id) -> (Tensor grad_embed_weight, Tensor grad_image_embeds)");
}

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "nvlm_kernels native ops; importing this module registers torch.ops.nvlm_kernels";
#ifdef NVLM_WITH_CUDA
  module.attr("cuda_built") = true;
#else
  module.attr("cuda_built") = false;
#endif
}
