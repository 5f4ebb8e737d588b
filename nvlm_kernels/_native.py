"""The `native` backend: ops compiled into nvlm_kernels._C (csrc/), with their fake and autograd
registrations so that they work under autograd and torch.compile.

The C++ side defines the schemas (TORCH_LIBRARY(nvlm_kernels, m) in csrc/ops.cpp) and the CPU /
CUDA kernels; this module loads it on first use (never at package import) and registers the fake
implementations and autograd formulas of _registration.py for them.

One exception: `varlen_attention` on the CPU runs aten's fused CPU attention kernel
(scaled_dot_product_attention, a compiled flash-attention with its own backward), batched over runs
of equal-length sequences. For 112 ViT tiles of 65 tokens (4 heads x 32) forward + backward takes
34 ms instead of the reference's 358 ms on this project's 2-core machine (1 thread); causal packs
of mixed lengths gain less (75 vs 108 ms for 16 x 200 tokens), one call per sequence. It reads
cu_seqlens on the host, so torch.compile breaks the graph there (the Triton kernel does not).
With fewer keys than its vector width (16 floats with AVX-512) that kernel returns 0 for a query
row of NaN (or of only -inf) scores, as for a fully masked row, where the reference gives NaN:
inputs that could give a non-finite score go to the reference instead, found by one aminmax over q
and k (0.2 ms of those 34 ms).
"""

from __future__ import annotations

import functools

import torch

from . import _registration, reference
from ._validate import FLOAT_DTYPES
from ._implementation import Implementation



@functools.lru_cache(maxsize=None)
def load_error() -> str | None:
    """None when nvlm_kernels._C imported and registered, else the reason it did not."""
    try:
        from . import _C  # noqa: F401, PLC0415  (registers torch.ops.nvlm_kernels)
    except ImportError as exc:
        return (f"nvlm_kernels._C is not built or failed to load ({exc}); reinstall with "
                f"`pip install --no-build-isolation -e .` and check its build log")
    _register_python_side()
    return None


def cuda_built() -> bool:
    from . import _C  # noqa: PLC0415

    return bool(_C.cuda_built)


def _has_kernel(op: str, device_type: str) -> bool:
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
        f"nvlm_kernels::{op}", key)


def pixel_shuffle(x: torch.Tensor, scale: int = 2,
                  grid: tuple[int, int] | None = None) -> torch.Tensor:
    grid_h, grid_w = grid
    return torch.ops.nvlm_kernels.pixel_shuffle(x, scale, grid_h, grid_w)


def pixel_shuffle_layernorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                            eps: float = 1e-5, scale: int = 2,
                            grid: tuple[int, int] | None = None) -> torch.Tensor:
    grid_h, grid_w = grid
    out, _mean, _rstd = torch.ops.nvlm_kernels.pixel_shuffle_layernorm(
        x, weight.to(x.dtype), bias.to(x.dtype), float(eps), scale, grid_h, grid_w)
    return out


def multimodal_embed(input_ids: torch.Tensor, embed_weight: torch.Tensor,
                     image_embeds: torch.Tensor, image_token_id: int) -> torch.Tensor:
    return torch.ops.nvlm_kernels.multimodal_embed(input_ids, embed_weight, image_embeds,
                                                   image_token_id)


def _scores_may_be_non_finite(q: torch.Tensor, k: torch.Tensor, scale: float) -> bool:
    """Whether some score q.k * scale may be NaN or +-inf: |q|max |k|max d |scale| bounds them,
    and a NaN or inf anywhere in q or k makes the bound NaN or inf. One read of q and k."""
    if q.numel() == 0 or k.numel() == 0:
        return False
    # aminmax propagates NaN and takes 0.1 ms per tensor for the ViT tiles above (abs().amax()
    # or vector_norm(inf): 2 ms); tolist(), not float(): torch.compile breaks the graph there as
    # quietly as at the cu_seqlens reads, without a warning
    (q_low, q_high), (k_low, k_high) = torch.aminmax(q.detach()), torch.aminmax(k.detach())
    q_max, k_max = torch.stack([torch.maximum(-q_low, q_high),
                                torch.maximum(-k_low, k_high)]).tolist()
    bound = q_max * k_max * q.shape[2] * abs(scale)
    # aten accumulates the scores in float32 (float64 for float64 inputs)
    return not bound < torch.finfo(torch.promote_types(q.dtype, torch.float32)).max


def varlen_attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int,
                         max_seqlen_k: int, softmax_scale: float | None = None,
                         causal: bool = False) -> torch.Tensor:
    scale = reference.softmax_scale_or_default(q, softmax_scale)
    if _scores_may_be_non_finite(q, k, scale):
        # where aten's kernel would return 0 for a row of NaN scores (see the module docstring)
        return reference.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                          max_seqlen_k, softmax_scale=scale, causal=causal)
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    lengths = [(starts_q[b + 1] - starts_q[b], starts_k[b + 1] - starts_k[b])
               for b in range(len(starts_q) - 1)]
    gqa = q.shape[1] != k.shape[1]
    pieces = []
    b = 0
    while b < len(lengths):
        lq, lk = lengths[b]
        run = 1      # consecutive sequences of the same lengths go through one batched call
        while b + run < len(lengths) and lengths[b + run] == (lq, lk):
            run += 1
        q0, k0 = starts_q[b], starts_k[b]
        if lq == 0:
            pass
        elif lk == 0 or (causal and lq != lk):
            # No key at all, or a bottom-right causal mask that SDPA's top-left is_causal does
            # not express (rows may see nothing): the reference's masked softmax, per sequence.
            for i in range(run):
                a, c = q0 + i * lq, k0 + i * lk
                pieces.append(reference.varlen_attention(
                    q[a:a + lq], k[c:c + lk], v[c:c + lk],
                    cu_seqlens_q.new_tensor([0, lq]), cu_seqlens_k.new_tensor([0, lk]),
                    lq, lk, softmax_scale=scale, causal=causal))
        else:
            def batched(x: torch.Tensor, start: int, length: int) -> torch.Tensor:
                rows = x[start:start + run * length]
                return rows.reshape(run, length, x.shape[1], x.shape[2]).transpose(1, 2)

            out = torch.nn.functional.scaled_dot_product_attention(
                batched(q, q0, lq), batched(k, k0, lk), batched(v, k0, lk), is_causal=causal,
                scale=scale, enable_gqa=gqa)
            pieces.append(out.transpose(1, 2).reshape(run * lq, q.shape[1], q.shape[2]))
        b += run
    return torch.cat(pieces) if pieces else q[:0] * 0.0


def _register_python_side() -> None:
    ops = torch.ops.nvlm_kernels
    _registration.register_pixel_shuffle(ops.pixel_shuffle.default, ops.pixel_unshuffle.default)
    _registration.register_pixel_shuffle_layernorm(ops.pixel_shuffle_layernorm.default,
                                                   ops.pixel_shuffle_layernorm_backward.default)
    _registration.register_multimodal_embed(ops.multimodal_embed.default,
                                            ops.multimodal_embed_backward.default)


def _float_on_compiled_device(op: str):
    def supports(device: torch.device, dtype: torch.dtype) -> str | None:
        if dtype not in FLOAT_DTYPES or (device.type == "cuda" and dtype == torch.float64):
            return f"dtype {dtype} is not supported on {device.type}"
        if not _has_kernel(op, device.type):
            return f"nvlm_kernels._C has no {device.type} kernel for {op}"
        return None

    return supports


def _cpu_only(device: torch.device, dtype: torch.dtype) -> str | None:
    if device.type != "cpu":
        return "the native varlen_attention is the CPU path; GPUs use the Triton kernel"
    return None if dtype in FLOAT_DTYPES else f"dtype {dtype} is not supported"


def implementations() -> dict[str, Implementation]:
    return {
        "varlen_attention": Implementation(varlen_attention_cpu, _cpu_only),
        "pixel_shuffle": Implementation(pixel_shuffle, _float_on_compiled_device("pixel_shuffle")),
        "pixel_shuffle_layernorm": Implementation(
            pixel_shuffle_layernorm, _float_on_compiled_device("pixel_shuffle_layernorm")),
        "multimodal_embed": Implementation(
            multimodal_embed, _float_on_compiled_device("multimodal_embed")),
    }
