"""Small building blocks shared by the vision encoder, the decoder and the X-attn blocks."""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch
from torch import nn


class RMSNorm(nn.Module):
    """x / rms(x) * weight, the statistics in float32 (as Qwen2 and InternViT compute them), the
    product in x's dtype; so bf16 activations with fp32 weights behave like the reference models."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def init_linear(linear: nn.Linear, std: float = 0.02) -> None:
    nn.init.normal_(linear.weight, std=std)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


@functools.lru_cache(maxsize=1)
def _nvtx_push_pop():
    """The `nvtx` package's push/pop when installed, else torch.cuda.nvtx's where CUDA exists,
    else None (ranges become no-ops on the CPU)."""
    try:
        import nvtx

        return nvtx.push_range, nvtx.pop_range
    except ImportError:
        pass
    if torch.cuda.is_available():
        return torch.cuda.nvtx.range_push, torch.cuda.nvtx.range_pop
    return None


@contextlib.contextmanager
def nvtx_range(name: str) -> Iterator[None]:
    """An NVTX range around a model stage (vision / projector / decoder / xattn) for Nsight."""
    push_pop = None if torch.compiler.is_compiling() else _nvtx_push_pop()
    if push_pop is None:
        yield
        return
    push, pop = push_pop
    push(name)
    try:
        yield
    finally:
        pop()
