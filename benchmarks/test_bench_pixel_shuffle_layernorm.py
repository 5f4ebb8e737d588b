"""pixel_shuffle_layernorm: every backend vs eager (view/permute/contiguous + F.layer_norm) at
NVLM's shape: 7 tiles x 1024 InternViT-6B tokens x 3200 channels -> 7 x 256 x 12800."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import nvlm_kernels as nk
from bench_utils import (IMPLEMENTATIONS, bench_dtype, on_backend, record,
                         require_implementation, synchronized)

OP = "pixel_shuffle_layernorm"
TILES, TOKENS, CHANNELS, SCALE = 7, 1024, 3200, 2
WIDTH = CHANNELS * SCALE * SCALE
SHAPE = f"{TILES}x{TOKENS}x{CHANNELS}"


def eager_pixel_shuffle_layernorm(x, weight, bias):
    side = int(TOKENS ** 0.5)
    y = x.view(TILES, side // SCALE, SCALE, side // SCALE, SCALE, CHANNELS)
    y = y.permute(0, 1, 3, 2, 4, 5).contiguous().view(TILES, TOKENS // SCALE**2, WIDTH)
    return F.layer_norm(y, (WIDTH,), weight, bias, 1e-5)


def implementation(impl: str):
    if impl == "eager":
        return eager_pixel_shuffle_layernorm
    return on_backend(impl, lambda x, w, b: nk.pixel_shuffle_layernorm(x, w, b, 1e-5, SCALE))


def inputs(device: str, requires_grad: bool):
    dtype = bench_dtype(device)
    x = torch.randn(TILES, TOKENS, CHANNELS, device=device, dtype=dtype)
    weight = torch.randn(WIDTH, device=device, dtype=dtype)
    bias = torch.randn(WIDTH, device=device, dtype=dtype)
    return [t.requires_grad_(requires_grad) for t in (x, weight, bias)]


def element_bytes(device: str) -> int:
    return TILES * TOKENS * CHANNELS * bench_dtype(device).itemsize


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_forward(benchmark, device, impl):
    require_implementation(impl, OP, device)
    x, weight, bias = inputs(device, requires_grad=False)
    fn = implementation(impl)
    # read x, write out
    record(benchmark, op=OP, mode="forward", impl=impl, device=device, shape=SHAPE,
           nbytes=2 * element_bytes(device))
    out = benchmark(synchronized(lambda: fn(x, weight, bias), device))
    assert out.shape == (TILES, TOKENS // SCALE**2, WIDTH)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_forward_backward(benchmark, device, impl):
    require_implementation(impl, OP, device)
    x, weight, bias = inputs(device, requires_grad=True)
    grad = torch.randn(TILES, TOKENS // SCALE**2, WIDTH, device=device, dtype=x.dtype)
    fn = implementation(impl)

    def step():
        return torch.autograd.grad(fn(x, weight, bias), (x, weight, bias), grad)

    # forward: read x, write out; backward: read grad, read x, write dx
    record(benchmark, op=OP, mode="forward+backward", impl=impl, device=device, shape=SHAPE,
           nbytes=5 * element_bytes(device))
    grads = benchmark(synchronized(step, device))
    assert grads[0].shape == x.shape
