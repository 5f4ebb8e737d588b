"""The public ops of nvlm_kernels: validate the inputs, pick the backend, run it.

Shapes follow flash-attention: packed tokens first, `(total, nheads, headdim)`. The meaning of
each op is its eager definition in reference.py; the backends (see _backends.py) must match it.
"""

from __future__ import annotations

import torch

from . import _backends, _validate
from ._sparse_embedding import multimodal_embed_sparse_grad


def pixel_shuffle(x: torch.Tensor, scale: int = 2,
                  grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Fold each scale x scale block of ViT tokens into channels (NVLM "v2" layout).

    Args:
        x: `(N, L, C)` tokens of N tiles, L = h * w in row-major grid order (CLS already dropped).
        scale: the fold factor s; h and w must be multiples of it.
        grid: `(h, w)` for a non-square grid; by default L must be a square h * h.
    Returns:
        `(N, L / s^2, C * s^2)`: token (r, c) of the (h/s) x (w/s) grid holds the channels of
        patches (s*r + i, s*c + j) for i, j in [0, s), i-major; for s = 2:
        `[ (2r, 2c) | (2r, 2c+1) | (2r+1, 2c) | (2r+1, 2c+1) ]` (docs/nvlm.md section 4).
    """
    grid = _validate.shuffle_grid(x, scale, grid)
    return _backends.implementation("pixel_shuffle", x)(x, scale=scale, grid=grid)


def pixel_shuffle_layernorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                            eps: float = 1e-5, scale: int = 2,
                            grid: tuple[int, int] | None = None) -> torch.Tensor:
    """`layer_norm(pixel_shuffle(x, scale, grid))` over the last dim, in one pass.

    The first layer of the NVLM projector fused with the token fold. weight and bias are
    `(C * s^2,)`; if their dtype differs from x's (fp32 LayerNorm parameters with bf16
    activations) they are cast to x's dtype, and their gradients come back in their own dtype.
    Statistics are computed in float32 (float64 for float64 x). Returns `(N, L / s^2, C * s^2)`.
    """
    grid = _validate.pixel_shuffle_layernorm_args(x, weight, bias, eps, scale, grid)
    return _backends.implementation("pixel_shuffle_layernorm", x)(
        x, weight, bias, eps=eps, scale=scale, grid=grid)


def multimodal_embed(input_ids: torch.Tensor, embed_weight: torch.Tensor,
                     image_embeds: torch.Tensor, image_token_id: int, *,
                     sparse_grad: bool = False) -> torch.Tensor:
    """Token embeddings with the image rows written over the image placeholders.

    Args:
        input_ids: `(...)` int32/int64 token ids; positions equal to `image_token_id` are
            placeholders, every other id must lie in [0, V).
        embed_weight: `(V, D)` embedding table.
        image_embeds: `(M, D)`, M = number of placeholders; row m fills the m-th placeholder in
            row-major order of input_ids.
        image_token_id: the placeholder id (it need not be a row of the table).
        sparse_grad: give embed_weight's gradient as an uncoalesced sparse COO tensor, as
            nn.Embedding(sparse=True) does: no (V, D) gradient is made, and autograd adds it
            into an existing dense `.grad` touching only the tokens' rows (else `.grad` becomes
            sparse: SGD, SparseAdam and Adagrad take it, AdamW does not). Eager mode only
            (torch.compile does not trace sparse gradients).
    Returns:
        `(..., D)`: embed_weight[id] at text positions, the next image row at placeholders.
    """
    _validate.multimodal_embed_args(input_ids, embed_weight, image_embeds, image_token_id)
    if not isinstance(sparse_grad, bool):
        raise TypeError(f"sparse_grad must be a bool, got {type(sparse_grad).__name__}")
    forward = _backends.implementation("multimodal_embed", embed_weight)
    if sparse_grad:
        return multimodal_embed_sparse_grad(forward, input_ids, embed_weight, image_embeds,
                                            image_token_id)
    return forward(input_ids, embed_weight, image_embeds, image_token_id)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int,
                     max_seqlen_k: int, softmax_scale: float | None = None,
                     causal: bool = False) -> torch.Tensor:
    """Attention over packed variable-length sequences; a drop-in for `flash_attn_varlen_func`.

    Args:
        q: `(total_q, nheads_q, headdim)`.
        k, v: `(total_k, nheads_k, headdim)`, nheads_q % nheads_k == 0 (GQA: query head h reads
            key head h // (nheads_q / nheads_k)).
        cu_seqlens_q, cu_seqlens_k: `(batch_size + 1,)` int32 offsets: sequence b is
            q[cu_seqlens_q[b]:cu_seqlens_q[b+1]] over k/v[cu_seqlens_k[b]:cu_seqlens_k[b+1]].
        max_seqlen_q, max_seqlen_k: upper bounds of the sequence lengths, at most total_q and
            total_k (they size the kernel's grid); an empty pack takes any value.
        softmax_scale: defaults to 1 / sqrt(headdim).
        causal: mask aligned bottom-right; with lq = 2 queries over lk = 5 keys (x = visible):
                x x x x .
                x x x x x
            A query row that sees no key returns 0.
    Returns:
        `(total_q, nheads_q, headdim)`.
    """
    _validate.varlen_attention_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                    max_seqlen_k, softmax_scale, causal)
    return _backends.implementation("varlen_attention", q)(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        softmax_scale=softmax_scale, causal=causal)


def cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_start: torch.Tensor,
                    kv_end: torch.Tensor, softmax_scale: float | None = None,
                    gate: torch.Tensor | float | None = None) -> torch.Tensor:
    """Gated cross-attention of packed text queries over a packed memory (NVLM-X/H, docs/nvlm.md §8).

    Args:
        q: `(total_q, nheads_q, headdim)` text queries.
        k, v: `(total_kv, nheads_k, headdim)` memory (image tokens at the LLM width), GQA as in
            varlen_attention.
        kv_start, kv_end: `(total_q,)` int32: query row i sees memory rows
            [kv_start[i], kv_end[i]); an empty range (start == end) gives a 0 row.
        softmax_scale: defaults to 1 / sqrt(headdim).
        gate: None, a number, a 1-element tensor, or `(nheads_q,)`: the output is multiplied by
            tanh(gate) (per query head), and gradients flow to a tensor gate.
    Returns:
        `(total_q, nheads_q, headdim)`.
    """
    _validate.cross_attention_args(q, k, v, kv_start, kv_end, softmax_scale, gate)
    return _backends.implementation("cross_attention", q)(
        q, k, v, kv_start, kv_end, softmax_scale=softmax_scale, gate=gate)
