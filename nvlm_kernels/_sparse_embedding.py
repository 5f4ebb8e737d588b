"""multimodal_embed with a sparse table gradient (`sparse_grad=True`), on every backend.

The dense table gradient is a (V, D) tensor: its backward pays a memset of the whole table
(Qwen2-72B: 152064 x 8192 bf16 = 2.5 GB) to fill a few thousand rows, and that memset caps the
fused kernels' forward + backward near 1.2-1.3x eager, which pays it too. With sparse_grad the
table gradient is an uncoalesced sparse COO tensor with one entry per token, as
nn.Embedding(sparse=True) gives: its values are grad_out's rows (zero at placeholders and at
ids outside the table, which the forward reads as zero rows) and no (V, D) tensor is made.
Autograd then adds it into an existing dense `.grad` touching only those rows, or into a tied
output layer's dense gradient; with no `.grad` yet the parameter's `.grad` becomes sparse,
which only optimizers with sparse support take (SGD, SparseAdam, Adagrad), exactly as for
nn.Embedding(sparse=True). The forward is the backend's fused kernel; the backward is a few
torch ops, without a host sync (the placeholder count is the image rows' count).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class SparseTableGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, forward: Callable, input_ids: torch.Tensor, embed_weight: torch.Tensor,
                image_embeds: torch.Tensor, image_token_id: int) -> torch.Tensor:
        ctx.save_for_backward(input_ids)
        ctx.sizes = (embed_weight.shape[0], image_embeds.shape[0], image_token_id)
        return forward(input_ids, embed_weight, image_embeds, image_token_id)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        (input_ids,) = ctx.saved_tensors
        vocab, num_images, image_token_id = ctx.sizes
        ids = input_ids.reshape(-1)
        rows = grad_out.reshape(ids.numel(), -1)
        is_image = ids == image_token_id
        grad_table = grad_images = None
        if ctx.needs_input_grad[2]:
            text = ~is_image & (ids >= 0) & (ids < vocab)
            indices = ids.where(text, 0).to(torch.int64)[None]    # in range by construction
            grad_table = torch.sparse_coo_tensor(indices, rows * text[:, None],
                                                 (vocab, rows.shape[1]), is_coalesced=False,
                                                 check_invariants=False)
        if ctx.needs_input_grad[3]:
            # -1 pads the positions when fewer placeholders than image rows (unvalidated
            # contents); such image rows get a zero gradient, as the forward wrote them nowhere
            positions = torch.nonzero_static(is_image, size=num_images, fill_value=-1)[:, 0]
            grad_images = rows.index_select(0, positions.clamp(min=0)) * (positions >= 0)[:, None]
        return None, None, grad_table, grad_images, None


def multimodal_embed_sparse_grad(forward: Callable, input_ids: torch.Tensor,
                                 embed_weight: torch.Tensor, image_embeds: torch.Tensor,
                                 image_token_id: int) -> torch.Tensor:
    """forward(input_ids, embed_weight, image_embeds, image_token_id), run without autograd,
    with the gradients above."""
    return SparseTableGradient.apply(forward, input_ids, embed_weight, image_embeds,
                                     image_token_id)
