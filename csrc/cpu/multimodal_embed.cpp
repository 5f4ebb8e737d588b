// CPU implementation of nvlm_kernels::multimodal_embed and its backward.
//
// Forward: one pass; every output row is a copy of a table row (text id) or of the next image row
// (placeholder), the image row being the placeholder's running count. Rows are copied in
// parallel after a sequential prefix count over the ids (a few microseconds for 32K tokens).
// Ids outside the table, or placeholders beyond the image rows, give zero rows rather than reads
// out of bounds (the Python API rejects them before; direct callers of the op are safe too).
//
// Backward: d image_embeds is a row gather. d embed_weight sums the gradient rows of each id:
// text positions are sorted stably by id and each run of equal ids is summed in position order in
// the op-math type and written once, so the result is deterministic and needs no atomics.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <vector>

#include "common.h"

namespace nvlm {
namespace {

// image_row[t] = index of the image row for placeholder t (its running count), -1 for text.
template <typename index_t>
std::vector<int64_t> image_rows(const index_t* ids, int64_t tokens, int64_t image_token_id) {
  std::vector<int64_t> rows(static_cast<size_t>(tokens), -1);
  int64_t count = 0;
  for (int64_t t = 0; t < tokens; ++t) {
    if (static_cast<int64_t>(ids[t]) == image_token_id) rows[t] = count++;
  }
  return rows;
}

void check_ids(const at::Tensor& ids) {
  TORCH_CHECK(ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong,
              "input_ids must be int32 or int64, got ", ids.scalar_type());
}

at::Tensor multimodal_embed_cpu(const at::Tensor& input_ids, const at::Tensor& embed_weight,
                                const at::Tensor& image_embeds, int64_t image_token_id) {
  check_ids(input_ids);
  TORCH_CHECK(embed_weight.dim() == 2 && image_embeds.dim() == 2,
              "embed_weight and image_embeds must be 2-D");
  TORCH_CHECK(embed_weight.size(1) == image_embeds.size(1),
              "embed_weight and image_embeds must have the same width");
  TORCH_CHECK(embed_weight.scalar_type() == image_embeds.scalar_type(),
              "embed_weight and image_embeds must have the same dtype");
  const at::Tensor ids = input_ids.reshape(-1).contiguous();
  const at::Tensor table = embed_weight.contiguous(), images = image_embeds.contiguous();
  const int64_t tokens = ids.numel(), vocab = table.size(0), num_images = images.size(0);
  const int64_t dim = table.size(1);
  std::vector<int64_t> out_sizes(input_ids.sizes().begin(), input_ids.sizes().end());
  out_sizes.push_back(dim);
  at::Tensor out = new_output(out_sizes, table.options());
  if (tokens == 0 || dim == 0) return out;
  const int64_t row_bytes = dim * static_cast<int64_t>(table.element_size());
  const char* table_bytes = static_cast<const char*>(table.const_data_ptr());
  const char* image_bytes = static_cast<const char*>(images.const_data_ptr());
  char* out_bytes = static_cast<char*>(out.mutable_data_ptr());
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "multimodal_embed_cpu", [&] {
    const index_t* id_data = ids.const_data_ptr<index_t>();
    const std::vector<int64_t> rows = image_rows(id_data, tokens, image_token_id);
    // ~64 KB of rows per task
    const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(row_bytes, 1));
    at::parallel_for(0, tokens, grain, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t id = static_cast<int64_t>(id_data[t]);
        const char* source = nullptr;
        if (rows[t] >= 0) {
          if (rows[t] < num_images) source = image_bytes + rows[t] * row_bytes;
        } else if (id >= 0 && id < vocab) {
          source = table_bytes + id * row_bytes;
        }
        char* target = out_bytes + t * row_bytes;
        if (source != nullptr) {
          std::memcpy(target, source, static_cast<size_t>(row_bytes));
        } else {
          std::memset(target, 0, static_cast<size_t>(row_bytes));
        }
      }
    });
  });
  return out;
}

template <typename scalar_t, typename index_t>
void table_grad(const scalar_t* grad, const index_t* ids, const std::vector<int64_t>& rows,
                int64_t tokens, int64_t vocab, int64_t dim, scalar_t* grad_table) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<int64_t> order;
  order.reserve(static_cast<size_t>(tokens));
  for (int64_t t = 0; t < tokens; ++t) {
    const int64_t id = static_cast<int64_t>(ids[t]);
    if (rows[t] < 0 && id >= 0 && id < vocab) order.push_back(t);
  }
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return ids[a] < ids[b]; });
  std::vector<int64_t> run_starts;
  for (size_t i = 0; i < order.size(); ++i) {
    if (i == 0 || ids[order[i]] != ids[order[i - 1]]) run_starts.push_back(static_cast<int64_t>(i));
  }
  run_starts.push_back(static_cast<int64_t>(order.size()));
  const int64_t runs = static_cast<int64_t>(run_starts.size()) - 1;
  at::parallel_for(0, runs, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> total(static_cast<size_t>(dim));
    for (int64_t run = begin; run < end; ++run) {
      std::fill(total.begin(), total.end(), acc_t(0));
      for (int64_t i = run_starts[run]; i < run_starts[run + 1]; ++i) {
        const scalar_t* row = grad + order[i] * dim;
        for (int64_t c = 0; c < dim; ++c) total[c] += static_cast<acc_t>(row[c]);
      }
      scalar_t* target = grad_table + static_cast<int64_t>(ids[order[run_starts[run]]]) * dim;
      for (int64_t c = 0; c < dim; ++c) target[c] = static_cast<scalar_t>(total[c]);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> multimodal_embed_backward_cpu(const at::Tensor& grad_out_in,
                                                                 const at::Tensor& input_ids,
                                                                 int64_t vocab, int64_t num_images,
                                                                 int64_t image_token_id) {
  check_ids(input_ids);
  TORCH_CHECK(vocab >= 0 && num_images >= 0, "vocab and num_images must be >= 0");
  const at::Tensor ids = input_ids.reshape(-1).contiguous();
  const int64_t tokens = ids.numel();
  const int64_t dim = grad_out_in.size(-1);
  TORCH_CHECK(grad_out_in.numel() == tokens * dim, "grad_out must have ", tokens * dim,
              " elements, got ", grad_out_in.numel());
  const at::Tensor grad_out = grad_out_in.reshape({tokens, dim}).contiguous();
  // Zero-initialized: table rows of ids that do not occur, and image rows without a
  // placeholder (only possible with unvalidated contents), get no gradient.
  at::Tensor grad_table = at::zeros({vocab, dim}, grad_out.options());
  at::Tensor grad_images = at::zeros({num_images, dim}, grad_out.options());
  if (tokens == 0 || dim == 0) return {grad_table, grad_images};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad_out.scalar_type(), "multimodal_embed_backward_cpu", [&] {
        using scalar = scalar_t;
        AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "multimodal_embed_backward_cpu_ids", [&] {
          const index_t* id_data = ids.const_data_ptr<index_t>();
          const scalar* grad = grad_out.const_data_ptr<scalar>();
          const std::vector<int64_t> rows = image_rows(id_data, tokens, image_token_id);
          scalar* image_grad = grad_images.mutable_data_ptr<scalar>();
          at::parallel_for(0, tokens, 256, [&](int64_t begin, int64_t end) {
            for (int64_t t = begin; t < end; ++t) {
              if (rows[t] >= 0 && rows[t] < num_images) {
                std::memcpy(image_grad + rows[t] * dim, grad + t * dim,
                            static_cast<size_t>(dim) * sizeof(scalar));
              }
            }
          });
          table_grad<scalar, index_t>(grad, id_data, rows, tokens, vocab, dim,
                                      grad_table.mutable_data_ptr<scalar>());
        });
      });
  return {grad_table, grad_images};
}

}  // namespace

TORCH_LIBRARY_IMPL(nvlm_kernels, CPU, m) {
  m.impl("multimodal_embed", &multimodal_embed_cpu);
  m.impl("multimodal_embed_backward", &multimodal_embed_backward_cpu);
}

}  // namespace nvlm
