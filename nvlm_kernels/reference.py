"""Eager-PyTorch definitions of every nvlm_kernels op: the `torch` backend and the meaning of correct.

Written for clarity, with autograd doing the backward. Each function takes the arguments of the
public op (nvlm_kernels.<op>) after validation; the tests run these in float64 and every other
backend must match them (docs/design.md, "Correctness rule").

Precision follows fused kernels: attention scores q k^T and the softmax in at least float32, the
probabilities rounded to the input dtype before P v; LayerNorm statistics in at least float32.
So the error of this module in fp16/bf16 is a fair yardstick for the kernels.
"""

from __future__ import annotations

import math

import einops
import torch
import torch.nn.functional as F

from . import _validate

# Query rows per block in cross_attention: bounds the (heads, rows, keys) score tensor while each
# block only looks at the keys its rows can see.
_CROSS_ATTENTION_QUERY_BLOCK = 256


def pixel_shuffle(x: torch.Tensor, scale: int = 2, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """x (N, h*w, C) -> (N, (h/s)*(w/s), C*s*s); output token (r, c) holds input patches
    (s*r + i, s*c + j) for i, j in [0, s), i-major (NVLM "v2" layout, docs/nvlm.md section 4)."""
    h, w = _validate.shuffle_grid(x, scale, grid)
    # input token (s*r + i) * w + (s*c + j) -> output token r * (w/s) + c, channels (i, j, C)
    return einops.rearrange(x, "n (r i c j) ch -> n (r c) (i j ch)", i=scale, j=scale,
                            c=w // scale)


def pixel_shuffle_layernorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                            eps: float = 1e-5, scale: int = 2,
                            grid: tuple[int, int] | None = None) -> torch.Tensor:
    """layer_norm(pixel_shuffle(x)) over the C*s*s channels, with affine weight and bias."""
    y = pixel_shuffle(x, scale, grid)
    return F.layer_norm(y, (y.shape[-1],), weight.to(y.dtype), bias.to(y.dtype), eps)


def multimodal_embed(input_ids: torch.Tensor, embed_weight: torch.Tensor,
                     image_embeds: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """Embedding rows for text ids; the image rows, in order, at the image_token_id positions."""
    ids = input_ids.reshape(-1)
    is_image = ids == image_token_id
    # The placeholder id may lie outside the table: look up row 0 there, then overwrite it.
    text_embeds = F.embedding(ids.masked_fill(is_image, 0), embed_weight)
    out = text_embeds.index_put((is_image,), image_embeds)
    return out.view(*input_ids.shape, embed_weight.shape[1])


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor | None,
            softmax_scale: float) -> torch.Tensor:
    """Softmax attention of q (lq, Hq, d) over k, v (lk, Hkv, d); `visible` (lq, lk) masks keys.

    A query row with no visible key outputs 0 (and gets 0 gradients).
    """
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)  # query head h reads key head h // groups
    v = v.repeat_interleave(groups, dim=1)
    accumulate = torch.promote_types(q.dtype, torch.float32)
    scores = torch.einsum("qhd,khd->hqk", q.to(accumulate), k.to(accumulate)) * softmax_scale
    if visible is not None:
        # The dtype's minimum rather than -inf keeps the softmax of a row with no visible key
        # finite (uniform); the masked_fill after it then zeroes that row and its gradient.
        scores = scores.masked_fill(~visible, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1)
    if visible is not None:
        probs = probs.masked_fill(~visible, 0.0)
    return torch.einsum("hqk,khd->qhd", probs.to(v.dtype), v)


def softmax_scale_or_default(q: torch.Tensor, softmax_scale: float | None) -> float:
    """The attention ops' scale: softmax_scale, or 1/sqrt(head dim) when it is None."""
    return 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                     max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float | None = None,
                     causal: bool = False) -> torch.Tensor:
    """Attention within each packed sequence b: q[cu_q[b]:cu_q[b+1]] over k/v[cu_k[b]:cu_k[b+1]].

    Causal masks align bottom-right, as in flash-attention: with lq queries and lk keys, query i
    sees keys j <= i + lk - lq. For lq = 2, lk = 5 (x = visible):
        x x x x .
        x x x x x
    """
    scale = softmax_scale_or_default(q, softmax_scale)
    offsets_q, offsets_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outputs = []
    for b in range(len(offsets_q) - 1):
        q0, q1, k0, k1 = offsets_q[b], offsets_q[b + 1], offsets_k[b], offsets_k[b + 1]
        visible = None
        if causal:
            rows = torch.arange(q1 - q0, device=q.device)[:, None]
            cols = torch.arange(k1 - k0, device=q.device)[None, :]
            visible = cols <= rows + ((k1 - k0) - (q1 - q0))
        outputs.append(_attend(q[q0:q1], k[k0:k1], v[k0:k1], visible, scale))
    if not outputs:
        return q[:0] * 0.0
    return torch.cat(outputs)


def apply_gate(out: torch.Tensor, gate: torch.Tensor | float | None) -> torch.Tensor:
    """out (total, Hq, d) times tanh(gate); gate is None, a number, a 1-element or (Hq,) tensor."""
    if gate is None:
        return out
    if not isinstance(gate, torch.Tensor):
        return out * math.tanh(gate)
    factor = torch.tanh(gate.reshape(-1)).to(out.dtype)  # (1,) or (Hq,)
    return out * factor.view(1, -1, 1)


def cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_start: torch.Tensor,
                    kv_end: torch.Tensor, softmax_scale: float | None = None,
                    gate: torch.Tensor | float | None = None) -> torch.Tensor:
    """Query row i attends to memory rows [kv_start[i], kv_end[i]); output times tanh(gate)."""
    scale = softmax_scale_or_default(q, softmax_scale)
    total_q = q.shape[0]
    outputs = []
    for r0 in range(0, total_q, _CROSS_ATTENTION_QUERY_BLOCK):
        r1 = min(total_q, r0 + _CROSS_ATTENTION_QUERY_BLOCK)
        start, end = kv_start[r0:r1].long(), kv_end[r0:r1].long()
        nonempty = start < end
        if not bool(nonempty.any()):
            outputs.append(q[r0:r1] * 0.0)
            continue
        lo, hi = int(start[nonempty].min()), int(end[nonempty].max())
        keys = torch.arange(lo, hi, device=q.device)[None, :]
        visible = (keys >= start[:, None]) & (keys < end[:, None])
        outputs.append(_attend(q[r0:r1], k[lo:hi], v[lo:hi], visible, scale))
    out = torch.cat(outputs) if outputs else q[:0] * 0.0
    return apply_gate(out, gate)
