"""pixel_shuffle: every backend vs eager (view/permute/contiguous) at NVLM's shape, 7 tiles x
1024 InternViT-6B tokens x 3200 channels. Both move the same bytes: the ratio to the measured
copy bandwidth is the figure of merit."""

from __future__ import annotations

import pytest
import torch

import nvlm_kernels as nk
from bench_utils import (IMPLEMENTATIONS, bench_dtype, on_backend, record,
                         require_implementation, synchronized)

OP = "pixel_shuffle"
TILES, TOKENS, CHANNELS, SCALE = 7, 1024, 3200, 2
SHAPE = f"{TILES}x{TOKENS}x{CHANNELS}"


def eager_pixel_shuffle(x):
    side = int(TOKENS ** 0.5)
    y = x.view(TILES, side // SCALE, SCALE, side // SCALE, SCALE, CHANNELS)
    return y.permute(0, 1, 3, 2, 4, 5).contiguous().view(TILES, TOKENS // SCALE**2, -1)


def implementation(impl: str):
    return eager_pixel_shuffle if impl == "eager" else on_backend(impl, nk.pixel_shuffle)


def element_bytes(device: str) -> int:
    return TILES * TOKENS * CHANNELS * bench_dtype(device).itemsize


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_forward(benchmark, device, impl):
    require_implementation(impl, OP, device)
    x = torch.randn(TILES, TOKENS, CHANNELS, device=device, dtype=bench_dtype(device))
    fn = implementation(impl)
    record(benchmark, op=OP, mode="forward", impl=impl, device=device, shape=SHAPE,
           nbytes=2 * element_bytes(device))
    out = benchmark(synchronized(lambda: fn(x), device))
    assert out.shape == (TILES, TOKENS // SCALE**2, CHANNELS * SCALE**2)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_forward_backward(benchmark, device, impl):
    require_implementation(impl, OP, device)
    x = torch.randn(TILES, TOKENS, CHANNELS, device=device, dtype=bench_dtype(device),
                    requires_grad=True)
    grad = torch.randn(TILES, TOKENS // SCALE**2, CHANNELS * SCALE**2, device=device, dtype=x.dtype)
    fn = implementation(impl)
    record(benchmark, op=OP, mode="forward+backward", impl=impl, device=device, shape=SHAPE,
           nbytes=4 * element_bytes(device))
    grads = benchmark(synchronized(lambda: torch.autograd.grad(fn(x), x, grad), device))
    assert grads[0].shape == x.shape
