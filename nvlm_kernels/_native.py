"""The `native` backend: ops compiled into nvlm_kernels._C (csrc/), with their fake and autograd
registrations so that they work under autograd and torch.compile.

The C++ side defines the schemas (TORCH_LIBRARY(nvlm_kernels, m) in csrc/ops.cpp) and the CPU /
CUDA kernels; this module loads it on first use (never at package import) and registers:
  - a fake implementation per op (shapes only), for torch.compile and FakeTensor tracing;
  - autograd for each forward op, whose backward calls the matching `*_backward` native op.
"""

from __future__ import annotations

import functools

import torch

from . import _validate
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


# --------------------------------------------------------------------------------------------
# pixel_shuffle_layernorm


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _pixel_shuffle_layernorm_fake(x, weight, bias, eps, scale, grid_h, grid_w):
    rows = (grid_h // scale) * (grid_w // scale)
    out = x.new_empty((x.shape[0], rows, x.shape[2] * scale * scale))
    stats = x.new_empty((x.shape[0], rows), dtype=_stats_dtype(x.dtype))
    return out, stats, torch.empty_like(stats)


def _pixel_shuffle_layernorm_backward_fake(grad_out, x, weight, mean, rstd, scale, grid_h, grid_w):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(weight)


def _pixel_shuffle_layernorm_setup_context(ctx, inputs, output):
    x, weight, _bias, _eps, scale, grid_h, grid_w = inputs
    _out, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.geometry = (scale, grid_h, grid_w)
    ctx.mark_non_differentiable(mean, rstd)


def refuse_double_backward(op: str) -> None:
    """Called from a backward: with create_graph=True the gradient of our backward op would be
    silently zero, so say so instead."""
    if torch.is_grad_enabled():
        raise NotImplementedError(f"{op}: double backward (create_graph=True) is not supported by "
                                  f"the native and triton kernels; use the torch backend")


def _pixel_shuffle_layernorm_backward(ctx, grad_out, _grad_mean, _grad_rstd):
    refuse_double_backward("pixel_shuffle_layernorm")
    x, weight, mean, rstd = ctx.saved_tensors
    grad_x, grad_weight, grad_bias = torch.ops.nvlm_kernels.pixel_shuffle_layernorm_backward(
        grad_out, x, weight, mean, rstd, *ctx.geometry)
    return grad_x, grad_weight, grad_bias, None, None, None, None


def pixel_shuffle_layernorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                            eps: float = 1e-5, scale: int = 2,
                            grid: tuple[int, int] | None = None) -> torch.Tensor:
    grid_h, grid_w = _validate.shuffle_grid(x, scale, grid)
    out, _mean, _rstd = torch.ops.nvlm_kernels.pixel_shuffle_layernorm(
        x, weight.to(x.dtype), bias.to(x.dtype), float(eps), scale, grid_h, grid_w)
    return out


# --------------------------------------------------------------------------------------------


def _register_python_side() -> None:
    lib = "nvlm_kernels::"
    torch.library.register_fake(lib + "pixel_shuffle_layernorm")(_pixel_shuffle_layernorm_fake)
    torch.library.register_fake(lib + "pixel_shuffle_layernorm_backward")(
        _pixel_shuffle_layernorm_backward_fake)
    torch.library.register_autograd(lib + "pixel_shuffle_layernorm",
                                    _pixel_shuffle_layernorm_backward,
                                    setup_context=_pixel_shuffle_layernorm_setup_context)


def _float_on_compiled_device(op: str):
    def supports(device: torch.device, dtype: torch.dtype) -> str | None:
        if dtype not in _FLOAT_DTYPES:
            return f"dtype {dtype} is not supported"
        if not _has_kernel(op, device.type):
            return f"nvlm_kernels._C has no {device.type} kernel for {op}"
        return None

    return supports


def implementations() -> dict[str, Implementation]:
    return {
        "pixel_shuffle_layernorm": Implementation(
            pixel_shuffle_layernorm, _float_on_compiled_device("pixel_shuffle_layernorm")),
    }
