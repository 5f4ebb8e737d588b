"""Input validation for the public ops: one function per op, run before any backend.

Shapes, dtypes and devices are always checked (no device work). Tensor *contents* (cu_seqlens
ordering, key ranges, placeholder counts, id ranges) need a read of the data: they are checked for
CPU tensors, and for GPU tensors only when NVLM_KERNELS_DEBUG=1, because there each check costs a
device sync (the collator validates packed batches once on the host instead). Every error names
the argument, what was expected and what was given.

The content checks are custom ops (`nvlm_validate::*`) with an ordered effect, as
aten::_linalg_check_errors: under torch.compile they stay in the graph without breaking it, are
not dead-code eliminated although they return nothing, and run on the real tensors; on fake or meta
tensors they do nothing.
"""

from __future__ import annotations

import math
import numbers
import os

import torch

try:   # effectful custom ops (CustomOpDef.register_effect; private, so probed, not assumed)
    from torch._library.custom_ops import CustomOpDef
    from torch._library.effects import EffectType
except ImportError:
    CustomOpDef = EffectType = None

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# What the GPU kernels (Triton, CUDA) compute in; float64 runs on the CPU paths only.
KERNEL_DTYPES = FLOAT_DTYPES[:3]
INDEX_DTYPES = (torch.int32, torch.int64)
MAX_HEAD_DIM = 256


def contents_checked(tensor: torch.Tensor) -> bool:
    """Whether the contents of `tensor` are validated (CPU, or NVLM_KERNELS_DEBUG=1)."""
    return tensor.device.type == "cpu" or os.environ.get("NVLM_KERNELS_DEBUG", "") == "1"


# Whether this torch keeps the content checks inside compiled graphs (see the module docstring).
CHECKS_SURVIVE_COMPILE = EffectType is not None and hasattr(CustomOpDef, "register_effect")


def _content_check(name: str):
    """Turns `check(...) -> None`, which raises on bad contents, into the custom op
    nvlm_validate::name (see the module docstring). On a torch without effectful custom ops a
    compiled graph would drop the op as dead code, and a plain call would break the graph: there
    the check runs in eager calls only, as it did before."""
    def register(check):
        if not CHECKS_SURVIVE_COMPILE:
            def eager_only(*args):
                if not torch.compiler.is_compiling():
                    check(*args)
            return eager_only
        op = torch.library.custom_op(f"nvlm_validate::{name}", check, mutates_args=())
        op.register_fake(lambda *args: None)
        op.register_effect(EffectType.ORDERED)
        return op

    return register


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def require_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def require_rank(name: str, t: torch.Tensor, rank: int, layout: str) -> None:
    if t.dim() != rank:
        raise ValueError(f"{name} must be a {rank}-D tensor {layout}, got shape {_shape(t)}")


def require_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or "
                        f"float64), got {t.dtype}")


def require_same_dtype(reference_name: str, reference: torch.Tensor, **others: torch.Tensor) -> None:
    for name, t in others.items():
        if t.dtype != reference.dtype:
            raise TypeError(f"{name} must have the dtype of {reference_name} ({reference.dtype}), "
                            f"got {t.dtype}")


def require_same_device(reference_name: str, reference: torch.Tensor, **others: torch.Tensor) -> None:
    for name, t in others.items():
        if t.device != reference.device:
            raise ValueError(f"{name} must be on the device of {reference_name} "
                             f"({reference.device}), got {t.device}")


def require_int(name: str, value: object, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


# --------------------------------------------------------------------------------------------
# pixel shuffle


def shuffle_grid(x: torch.Tensor, scale: int, grid: tuple[int, int] | None) -> tuple[int, int]:
    """Validates x (N, L, C) and returns the (h, w) token grid that the shuffle folds."""
    require_tensor("x", x)
    require_rank("x", x, 3, "(N, L, C)")
    require_float("x", x)
    scale = require_int("scale", scale, minimum=1)
    # int(): under torch.compile with dynamic shapes this specializes L, which isqrt needs
    tokens, channels = int(x.shape[1]), x.shape[2]
    if channels < 1 or tokens < 1:
        raise ValueError(f"x must have at least one token and one channel per tile, got shape "
                         f"{_shape(x)}")
    if grid is None:
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise ValueError(f"x has L = {tokens} tokens per tile, which is not a square grid; "
                             f"pass grid=(h, w) with h * w = {tokens} for a non-square grid")
        h = w = side
    else:
        if not isinstance(grid, (tuple, list)) or len(grid) != 2:
            raise TypeError(f"grid must be a pair (h, w), got {grid!r}")
        h = require_int("grid[0]", grid[0], minimum=1)
        w = require_int("grid[1]", grid[1], minimum=1)
        if h * w != tokens:
            raise ValueError(f"grid {h}x{w} has {h * w} cells but x has L = {tokens} tokens")
    if h % scale or w % scale:
        raise ValueError(f"the {h}x{w} token grid is not divisible by scale = {scale}: "
                         f"both sides must be multiples of the scale")
    return h, w


def pixel_shuffle_layernorm_args(x, weight, bias, eps, scale, grid) -> tuple[int, int]:
    h, w = shuffle_grid(x, scale, grid)
    width = x.shape[2] * scale * scale
    for name, t in (("weight", weight), ("bias", bias)):
        require_tensor(name, t)
        require_float(name, t)
        if t.shape != (width,):
            raise ValueError(f"{name} must have shape ({width},) = (C * scale^2,) for x of shape "
                             f"{_shape(x)} and scale {scale}, got {_shape(t)}")
    require_same_dtype("weight", weight, bias=bias)
    require_same_device("x", x, weight=weight, bias=bias)
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a number, got {type(eps).__name__}")
    if not eps >= 0 or not math.isfinite(eps):
        raise ValueError(f"eps must be a finite non-negative number, got {eps!r}")
    return h, w


# --------------------------------------------------------------------------------------------
# multimodal embedding


def multimodal_embed_args(input_ids, embed_weight, image_embeds, image_token_id) -> None:
    require_tensor("input_ids", input_ids)
    require_tensor("embed_weight", embed_weight)
    require_tensor("image_embeds", image_embeds)
    if input_ids.dtype not in INDEX_DTYPES:
        raise TypeError(f"input_ids must be an int32 or int64 tensor of token ids, "
                        f"got {input_ids.dtype}")
    require_rank("embed_weight", embed_weight, 2, "(V, D)")
    require_rank("image_embeds", image_embeds, 2, "(M, D)")
    require_float("embed_weight", embed_weight)
    require_same_dtype("embed_weight", embed_weight, image_embeds=image_embeds)
    require_same_device("input_ids", input_ids, embed_weight=embed_weight,
                        image_embeds=image_embeds)
    if image_embeds.shape[1] != embed_weight.shape[1]:
        raise ValueError(f"image_embeds must have D = {embed_weight.shape[1]} columns like "
                         f"embed_weight, got shape {_shape(image_embeds)}")
    require_int("image_token_id", image_token_id)
    id_range = torch.iinfo(input_ids.dtype)
    if not id_range.min <= image_token_id <= id_range.max:
        # torch would wrap it in the comparison with the ids; the kernels compare in int64
        raise ValueError(f"image_token_id = {image_token_id} does not fit the {input_ids.dtype} "
                         f"input_ids [{id_range.min}, {id_range.max}]")
    if contents_checked(input_ids):
        _embed_contents(input_ids, image_token_id, image_embeds.shape[0], embed_weight.shape[0])


@_content_check("multimodal_embed_contents")
def _embed_contents(input_ids: torch.Tensor, image_token_id: int, image_rows: int,
                    vocab: int) -> None:
    is_image = input_ids == image_token_id
    placeholders = int(is_image.sum())
    if placeholders != image_rows:
        raise ValueError(f"input_ids hold {placeholders} image placeholders "
                         f"(image_token_id = {image_token_id}) but image_embeds has "
                         f"{image_rows} rows; they must be equal")
    text_ids = input_ids[~is_image]
    if text_ids.numel() and (int(text_ids.min()) < 0 or int(text_ids.max()) >= vocab):
        bad = text_ids[(text_ids < 0) | (text_ids >= vocab)][0]
        raise ValueError(f"input_ids contain id {int(bad)} outside the embedding table "
                         f"[0, {vocab})")


# --------------------------------------------------------------------------------------------
# attention


def _attention_qkv(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        require_tensor(name, t)
        require_rank(name, t, 3, "(total, nheads, headdim)")
        require_float(name, t)
    require_same_dtype("q", q, k=k, v=v)
    require_same_device("q", q, k=k, v=v)
    head_dim = q.shape[2]
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"q head dim must be in [1, {MAX_HEAD_DIM}], got {head_dim}")
    for name, t in (("k", k), ("v", v)):
        if t.shape[2] != head_dim:
            raise ValueError(f"{name} head dim must equal q's ({head_dim}), got shape {_shape(t)}")
    if v.shape[:2] != k.shape[:2]:
        raise ValueError(f"v must have k's (total, nheads) = {tuple(k.shape[:2])}, "
                         f"got shape {_shape(v)}")
    q_heads, kv_heads = q.shape[1], k.shape[1]
    if kv_heads < 1 or q_heads % kv_heads:
        raise ValueError(f"the {q_heads} query heads of q must be a multiple of the {kv_heads} "
                         f"key/value heads of k and v (GQA)")


def _softmax_scale(softmax_scale) -> None:
    if softmax_scale is None:
        return
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real):
        raise TypeError(f"softmax_scale must be None or a number, got {softmax_scale!r}")
    if not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale must be finite, got {softmax_scale!r}")


def _max_seqlen(name: str, value: object, total: int, total_name: str, cu_name: str) -> None:
    require_int(name, value, minimum=0)
    # It sizes the Triton grid (7 tokens with max_seqlen 64,000 took 10 s under the interpreter),
    # and no sequence is longer than all the tokens. An empty pack takes any value: no kernel
    # runs for it, and the ViT passes its tile length for a batch without tiles.
    if total and value > total:
        raise ValueError(f"{name} = {value} exceeds {total_name} = {total}, the number of tokens "
                         f"of all sequences together; pass the length of the longest sequence "
                         f"in {cu_name}, at most {total}")


def _cu_seqlens(name: str, cu: torch.Tensor, total: int, total_name: str, max_seqlen_name: str,
                max_seqlen: int, q: torch.Tensor) -> None:
    require_tensor(name, cu)
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be int32 (as in flash-attention), got {cu.dtype}")
    require_rank(name, cu, 1, "(batch_size + 1,)")
    if cu.numel() < 1:
        raise ValueError(f"{name} must hold at least one offset (0), got an empty tensor")
    require_same_device("q", q, **{name: cu})
    if contents_checked(cu):
        _cu_seqlens_contents(cu, name, total, total_name, max_seqlen, max_seqlen_name)


@_content_check("cu_seqlens_contents")
def _cu_seqlens_contents(cu: torch.Tensor, name: str, total: int, total_name: str,
                         max_seqlen: int, max_seqlen_name: str) -> None:
    offsets = cu.tolist()
    if offsets[0] != 0:
        raise ValueError(f"{name} must start at 0, got {offsets[0]}")
    lengths = [b - a for a, b in zip(offsets, offsets[1:])]
    if any(n < 0 for n in lengths):
        i = next(i for i, n in enumerate(lengths) if n < 0)
        raise ValueError(f"{name} must be non-decreasing, but {name}[{i + 1}] = "
                         f"{offsets[i + 1]} < {name}[{i}] = {offsets[i]}")
    if offsets[-1] != total:
        raise ValueError(f"{name} must end at {total_name} = {total}, got {offsets[-1]}")
    longest = max(lengths, default=0)
    if longest > max_seqlen:
        raise ValueError(f"{max_seqlen_name} = {max_seqlen} is smaller than the longest "
                         f"sequence in {name} ({longest})")


def varlen_attention_args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                          softmax_scale, causal) -> None:
    _attention_qkv(q, k, v)
    _max_seqlen("max_seqlen_q", max_seqlen_q, q.shape[0], "total_q", "cu_seqlens_q")
    _max_seqlen("max_seqlen_k", max_seqlen_k, k.shape[0], "total_k", "cu_seqlens_k")
    _softmax_scale(softmax_scale)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    _cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], "total_q", "max_seqlen_q",
                max_seqlen_q, q)
    _cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], "total_k", "max_seqlen_k",
                max_seqlen_k, q)
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of "
                         f"sequences, got shapes {_shape(cu_seqlens_q)} and {_shape(cu_seqlens_k)}")


def cross_attention_args(q, k, v, kv_start, kv_end, softmax_scale, gate) -> None:
    _attention_qkv(q, k, v)
    _softmax_scale(softmax_scale)
    total_q, total_kv = q.shape[0], k.shape[0]
    for name, t in (("kv_start", kv_start), ("kv_end", kv_end)):
        require_tensor(name, t)
        if t.dtype != torch.int32:
            raise TypeError(f"{name} must be int32, got {t.dtype}")
        if t.shape != (total_q,):
            raise ValueError(f"{name} must have shape (total_q,) = ({total_q},), one key range "
                             f"per query row, got {_shape(t)}")
        require_same_device("q", q, **{name: t})
    if gate is not None:
        if isinstance(gate, torch.Tensor):
            require_float("gate", gate)
            require_same_device("q", q, gate=gate)
            if gate.numel() != 1 and gate.shape != (q.shape[1],):
                raise ValueError(f"gate must be a scalar or have shape (nheads_q,) = "
                                 f"({q.shape[1]},), got {_shape(gate)}")
        elif isinstance(gate, bool) or not isinstance(gate, numbers.Real):
            raise TypeError(f"gate must be None, a number or a tensor, got {type(gate).__name__}")
    if contents_checked(kv_start):
        _kv_range_contents(kv_start, kv_end, total_kv)


@_content_check("kv_range_contents")
def _kv_range_contents(kv_start: torch.Tensor, kv_end: torch.Tensor, total_kv: int) -> None:
    start, end = kv_start.long(), kv_end.long()
    bad = (start < 0) | (end > total_kv)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"key range [kv_start[{i}], kv_end[{i}]) = [{int(start[i])}, "
                         f"{int(end[i])}) lies outside the memory [0, total_kv = {total_kv})")
    bad = start > end
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"kv_start[{i}] = {int(start[i])} is greater than kv_end[{i}] = "
                         f"{int(end[i])}; an empty range has kv_start == kv_end")
