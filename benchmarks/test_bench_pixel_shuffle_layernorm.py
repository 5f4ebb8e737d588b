"""pixel_shuffle_layernorm: every backend vs eager (view/permute/contiguous + F.layer_norm) at
NVLM's shape: 7 tiles x 1024 InternViT-6B tokens x 3200 channels -> 7 x 256 x 12800."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import nvlm_kernels as nk
from bench_utils import DEVICES, bench_dtype, synchronized

TILES, TOKENS, CHANNELS, SCALE = 7, 1024, 3200, 2
WIDTH = CHANNELS * SCALE * SCALE


def eager_pixel_shuffle_layernorm(x, weight, bias):
    side = int(TOKENS ** 0.5)
    y = x.view(TILES, side // SCALE, SCALE, side // SCALE, SCALE, CHANNELS)
    y = y.permute(0, 1, 3, 2, 4, 5).contiguous().view(TILES, TOKENS // SCALE**2, WIDTH)
    return F.layer_norm(y, (WIDTH,), weight, bias, 1e-5)


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


def candidates(device: str) -> list[str]:
    statuses = nk.available_backends()
    backends = [name for name in ("native", "triton") if statuses[name].available
                and "pixel_shuffle_layernorm" in statuses[name].ops
                and not (name == "triton" and device == "cpu")]
    return ["eager"] + backends


def implementation(name: str):
    if name == "eager":
        return eager_pixel_shuffle_layernorm

    def run(x, weight, bias):
        with nk.use_backend(name):
            return nk.pixel_shuffle_layernorm(x, weight, bias, 1e-5, SCALE)

    return run


def inputs(device: str, requires_grad: bool):
    dtype = bench_dtype(device)
    x = torch.randn(TILES, TOKENS, CHANNELS, device=device, dtype=dtype)
    weight = torch.randn(WIDTH, device=device, dtype=dtype)
    bias = torch.randn(WIDTH, device=device, dtype=dtype)
    return [t.requires_grad_(requires_grad) for t in (x, weight, bias)]


def record(benchmark, device: str, impl: str, mode: str, element_passes: int) -> None:
    """element_passes: reads + writes of the big tensor that an ideal fused kernel makes."""
    dtype = bench_dtype(device)
    benchmark.group = f"pixel_shuffle_layernorm {mode} {device}"
    benchmark.extra_info.update(
        op="pixel_shuffle_layernorm", mode=mode, impl=impl, device=device, dtype=str(dtype),
        shape=f"{TILES}x{TOKENS}x{CHANNELS}",
        bytes=element_passes * TILES * TOKENS * CHANNELS * dtype.itemsize)


@pytest.mark.parametrize("impl", ["eager", "native", "triton"])
def test_forward(benchmark, device, impl):
    if impl not in candidates(device):
        pytest.skip(f"{impl} has no pixel_shuffle_layernorm for {device}")
    x, weight, bias = inputs(device, requires_grad=False)
    fn = implementation(impl)
    record(benchmark, device, impl, "forward", element_passes=2)  # read x, write out
    out = benchmark(synchronized(lambda: fn(x, weight, bias), device))
    assert out.shape == (TILES, TOKENS // SCALE**2, WIDTH)


@pytest.mark.parametrize("impl", ["eager", "native", "triton"])
def test_forward_backward(benchmark, device, impl):
    if impl not in candidates(device):
        pytest.skip(f"{impl} has no pixel_shuffle_layernorm for {device}")
    x, weight, bias = inputs(device, requires_grad=True)
    grad = torch.randn(TILES, TOKENS // SCALE**2, WIDTH, device=device, dtype=x.dtype)
    fn = implementation(impl)

    def step():
        return torch.autograd.grad(fn(x, weight, bias), (x, weight, bias), grad)

    # forward: read x, write out; backward: read grad, read x, write dx
    record(benchmark, device, impl, "forward+backward", element_passes=5)
    grads = benchmark(synchronized(step, device))
    assert grads[0].shape == x.shape
