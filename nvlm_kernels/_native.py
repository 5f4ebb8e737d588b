"""The `native` backend: ops compiled into nvlm_kernels._C (csrc/), with their fake and autograd
registrations so that they work under autograd and torch.compile.

The C++ side defines the schemas (TORCH_LIBRARY(nvlm_kernels, m) in csrc/ops.cpp) and the CPU /
CUDA kernels; this module loads it on first use (never at package import) and registers the fake
implementations and autograd formulas of _registration.py for them.
"""

from __future__ import annotations

import functools

import torch

from . import _registration
from ._backends import Implementation

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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


def _register_python_side() -> None:
    ops = torch.ops.nvlm_kernels
    _registration.register_pixel_shuffle(ops.pixel_shuffle.default, ops.pixel_unshuffle.default)
    _registration.register_pixel_shuffle_layernorm(ops.pixel_shuffle_layernorm.default,
                                                   ops.pixel_shuffle_layernorm_backward.default)
    _registration.register_multimodal_embed(ops.multimodal_embed.default,
                                            ops.multimodal_embed_backward.default)


def _float_on_compiled_device(op: str):
    def supports(device: torch.device, dtype: torch.dtype) -> str | None:
        if dtype not in _FLOAT_DTYPES or (device.type == "cuda" and dtype == torch.float64):
            return f"dtype {dtype} is not supported on {device.type}"
        if not _has_kernel(op, device.type):
            return f"nvlm_kernels._C has no {device.type} kernel for {op}"
        return None

    return supports


def implementations() -> dict[str, Implementation]:
    return {
        "pixel_shuffle": Implementation(pixel_shuffle, _float_on_compiled_device("pixel_shuffle")),
        "pixel_shuffle_layernorm": Implementation(
            pixel_shuffle_layernorm, _float_on_compiled_device("pixel_shuffle_layernorm")),
        "multimodal_embed": Implementation(
            multimodal_embed, _float_on_compiled_device("multimodal_embed")),
    }
