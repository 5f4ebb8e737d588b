"""Triton multimodal embedding assembly: embedding lookup and image-row placement in one pass.

Forward: every output row is written once, copied either from the embedding table (text id) or
from the next image row (placeholder). The image row of a placeholder is its running count among
placeholders, from a device-side cumsum: no host sync. Ids outside the table and placeholder
counts beyond the image rows (only possible when contents are not validated) read nothing out of
bounds: such rows come out as zeros.

Backward:
  d image_embeds: a gather, d_images[m] = grad_out[position of the m-th placeholder];
  d embed_weight: a segmented sum over text positions sorted (stably) by id, in position order
    and fp32, no atomics: deterministic; rows of ids that do not occur stay zero. A run is summed
    in pieces of at most _CHUNK positions (one program each, from a run's first position or a
    chunk boundary inside a run); a piece that is its whole run writes the table row, the others
    leave fp32 partials that a second kernel adds chunk by chunk. Prediction for the GPU run: a
    run of 2,000 template tokens was one program's serial walk of 2,000 dependent row loads
    (~1-2 ms at ~0.5-1 us each, longer than the rest of the backward); pieced, it is at most
    64 + 2000 / 64 = 96 steps, so the table gradient of the "sft" benchmark case should drop to
    about the cost of its uniform-id twin, while uniform ids (runs of 1-2) pay only the second,
    nearly empty launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._memory import new_output
from .._registration import register_multimodal_embed

# Columns per program: 1024 bf16 = 2 KB rows chunks; D = 8192 gives 8 programs per token.
_MAX_BLOCK_D = 1024


# Longest serial sum of one program in the table gradient: runs of one id longer than this (chat
# template tokens, newlines, padding: hundreds to thousands of rows in real SFT batches) are cut
# into pieces of at most CHUNK rows, summed in parallel, and merged by a second kernel that adds
# at most length / CHUNK partials. 64 balances the two serial walks for runs of ~4k rows.
_CHUNK = 64


def _block_d(dim: int) -> int:
    return min(triton.next_power_of_2(max(dim, 1)), _MAX_BLOCK_D)


@triton.jit
def _multimodal_embed_fwd_kernel(ids_ptr, image_index_ptr, table_ptr, images_ptr, out_ptr,
                                 table_row_stride, images_row_stride, vocab, num_images, dim,
                                 image_token_id, BLOCK_D: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    token_id = tl.load(ids_ptr + token).to(tl.int64)
    is_image = token_id == image_token_id
    image_row = tl.load(image_index_ptr + token).to(tl.int64)
    row = tl.where(is_image, image_row, token_id)
    in_bounds = (row >= 0) & (row < tl.where(is_image, num_images, vocab))
    source = tl.where(is_image, images_ptr + row * images_row_stride, table_ptr + row * table_row_stride)
    # an out-of-bounds row loads no column (a scalar limit rather than `mask & in_bounds`, which
    # the Triton interpreter rejects)
    values = tl.load(source + cols, mask=cols < tl.where(in_bounds, dim, 0), other=0.0)
    tl.store(out_ptr + token * dim + cols, values, mask=cols < dim)


@triton.jit
def _image_grad_kernel(grad_ptr, positions_ptr, grad_images_ptr, dim, BLOCK_D: tl.constexpr):
    image_row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    position = tl.load(positions_ptr + image_row)  # -1: no placeholder for this row
    values = tl.load(grad_ptr + position * dim + cols, mask=cols < tl.where(position >= 0, dim, 0),
                     other=0.0)
    tl.store(grad_images_ptr + image_row * dim + cols, values, mask=cols < dim)


@triton.jit
def _run_continues(sorted_keys_ptr, position, key, num_tokens):
    """Whether the id at `position` is `key` (a run of `key` goes on there)."""
    return tl.load(sorted_keys_ptr + position, mask=position < num_tokens, other=-1) == key


@triton.jit
def _table_grad_kernel(grad_ptr, sorted_keys_ptr, order_ptr, grad_table_ptr, partials_ptr,
                       num_tokens, vocab, dim, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr):
    """Sum of the gradient rows of one piece of a run of equal ids: a piece starts at a run's
    first position or at a chunk boundary (positions multiple of CHUNK) inside a run, and ends
    at the run's end or the next boundary, so no program sums more than CHUNK rows. A piece
    that is its whole run writes the table row; the others leave fp32 partials for
    _table_grad_merge_kernel: slot 0 of their chunk when they continue a run from the chunk
    before, else slot 1 (the piece that starts a run and goes on into the next chunk)."""
    start = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < dim
    key = tl.load(sorted_keys_ptr + start)
    previous = tl.load(sorted_keys_ptr + start - 1, mask=start > 0, other=-1)
    run_start = key != previous
    chunk = start // CHUNK
    # key == vocab marks positions that carry no table gradient (placeholders, bad ids)
    if (run_start | (start % CHUNK == 0)) & (key < vocab):
        end = tl.minimum((chunk + 1) * CHUNK, num_tokens)
        total = tl.zeros((BLOCK_D,), dtype=tl.float32)
        position = start
        current = key
        while (current == key) & (position < end):
            token = tl.load(order_ptr + position)
            total += tl.load(grad_ptr + token * dim + cols, mask=col_mask, other=0.0).to(tl.float32)
            position += 1
            current = tl.load(sorted_keys_ptr + position, mask=position < num_tokens, other=-1)
        if run_start & (current != key):     # the whole run
            tl.store(grad_table_ptr + key * dim + cols,
                     total.to(grad_table_ptr.dtype.element_ty), mask=col_mask)
        else:
            slot = tl.where(run_start, 1, 0)
            tl.store(partials_ptr + (chunk * 2 + slot) * dim + cols, total, mask=col_mask)


@triton.jit
def _table_grad_merge_kernel(sorted_keys_ptr, grad_table_ptr, partials_ptr, num_tokens, vocab,
                             dim, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr):
    """The runs that cross a chunk boundary: the program of the chunk where such a run starts
    adds its partials chunk by chunk, in order (deterministic, fp32), and writes the row."""
    chunk = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < dim
    last = tl.minimum((chunk + 1) * CHUNK, num_tokens) - 1    # the chunk's last position
    key = tl.load(sorted_keys_ptr + last)
    before = tl.load(sorted_keys_ptr + chunk * CHUNK - 1, mask=chunk > 0, other=-1)
    going_on = _run_continues(sorted_keys_ptr, last + 1, key, num_tokens)
    # the run at the chunk's end starts in this chunk and goes on into the next one
    if (key < vocab) & (before != key) & going_on:
        total = tl.load(partials_ptr + (chunk * 2 + 1) * dim + cols, mask=col_mask, other=0.0)
        next_chunk = chunk + 1
        while going_on:   # the ids are sorted: the run covers every chunk up to where it ends
            total += tl.load(partials_ptr + next_chunk * 2 * dim + cols, mask=col_mask, other=0.0)
            next_chunk += 1
            going_on = _run_continues(sorted_keys_ptr, next_chunk * CHUNK, key, num_tokens)
        tl.store(grad_table_ptr + key * dim + cols,
                 total.to(grad_table_ptr.dtype.element_ty), mask=col_mask)


def _row_major(t: torch.Tensor) -> torch.Tensor:
    """Rows must be unit-stride for vector loads; any row stride is fine."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _image_index(ids: torch.Tensor, image_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    is_image = ids == image_token_id
    return is_image, torch.cumsum(is_image, 0, dtype=torch.int32) - 1


@torch.library.custom_op("nvlm_triton::multimodal_embed", mutates_args=())
def _multimodal_embed_op(input_ids: torch.Tensor, embed_weight: torch.Tensor,
                         image_embeds: torch.Tensor, image_token_id: int) -> torch.Tensor:
    ids = input_ids.reshape(-1).contiguous()
    table, images = _row_major(embed_weight), _row_major(image_embeds)
    vocab, dim = table.shape
    out = new_output((ids.numel(), dim), dtype=table.dtype, device=table.device)
    if ids.numel() and dim:
        _, image_index = _image_index(ids, image_token_id)
        block_d = _block_d(dim)
        _multimodal_embed_fwd_kernel[(ids.numel(), triton.cdiv(dim, block_d))](
            ids, image_index, table, images, out, table.stride(0), images.stride(0), vocab,
            images.shape[0], dim, image_token_id, BLOCK_D=block_d, num_warps=4)
    return out.view(*input_ids.shape, dim)


@torch.library.custom_op("nvlm_triton::multimodal_embed_backward", mutates_args=())
def _multimodal_embed_backward_op(grad_out: torch.Tensor, input_ids: torch.Tensor, vocab: int,
                                  num_images: int, image_token_id: int
                                  ) -> tuple[torch.Tensor, torch.Tensor]:
    ids = input_ids.reshape(-1).contiguous()
    tokens, dim = ids.numel(), grad_out.shape[-1]
    grad = grad_out.reshape(tokens, dim).contiguous()
    grad_table = torch.zeros((vocab, dim), dtype=grad.dtype, device=grad.device)
    grad_images = new_output((num_images, dim), dtype=grad.dtype, device=grad.device)
    if dim == 0:
        return grad_table, grad_images
    block_d = _block_d(dim)
    is_image, image_index = _image_index(ids, image_token_id)
    if num_images:
        # positions[m] = token of the m-th placeholder (-1 if none); slot num_images collects
        # the placeholders beyond the image rows, which only unvalidated contents can produce.
        positions = torch.full((num_images + 1,), -1, dtype=torch.int64, device=grad.device)
        slot = torch.where(is_image, image_index.long().clamp(max=num_images), num_images)
        positions.scatter_(0, slot, torch.arange(tokens, device=grad.device))
        _image_grad_kernel[(num_images, triton.cdiv(dim, block_d))](
            grad, positions, grad_images, dim, BLOCK_D=block_d, num_warps=4)
    if tokens and vocab:
        ids64 = ids.long()
        no_table_grad = is_image | (ids64 < 0) | (ids64 >= vocab)
        sorted_keys, order = torch.sort(ids64.masked_fill(no_table_grad, vocab), stable=True)
        chunks = triton.cdiv(tokens, _CHUNK)
        partials = torch.empty((chunks, 2, dim), dtype=torch.float32, device=grad.device)
        _table_grad_kernel[(tokens, triton.cdiv(dim, block_d))](
            grad, sorted_keys, order, grad_table, partials, tokens, vocab, dim, CHUNK=_CHUNK,
            BLOCK_D=block_d, num_warps=4)
        if chunks > 1:
            _table_grad_merge_kernel[(chunks - 1, triton.cdiv(dim, block_d))](
                sorted_keys, grad_table, partials, tokens, vocab, dim, CHUNK=_CHUNK,
                BLOCK_D=block_d, num_warps=4)
    return grad_table, grad_images


register_multimodal_embed(_multimodal_embed_op, _multimodal_embed_backward_op)


def multimodal_embed(input_ids: torch.Tensor, embed_weight: torch.Tensor,
                     image_embeds: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """The triton backend of nvlm_kernels.multimodal_embed (inputs already validated)."""
    return _multimodal_embed_op(input_ids, embed_weight, image_embeds, image_token_id)
