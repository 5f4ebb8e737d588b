"""pixel_shuffle: every backend vs eager (view/permute/contiguous) at NVLM's shape, 7 tiles x
1024 InternViT-6B tokens x 3200 channels (cases.memory_cases). Both move the same bytes: the
ratio to the measured copy bandwidth is the figure of merit."""

from __future__ import annotations

import pytest

from bench_utils import IMPLEMENTATIONS, bench_memory_op

OP = "pixel_shuffle"


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_forward(benchmark, device, impl):
    out, (x,) = bench_memory_op(benchmark, OP, impl, device, "forward")
    n, length, channels = x.shape
    assert out.shape == (n, length // 4, channels * 4)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_forward_backward(benchmark, device, impl):
    grads, (x,) = bench_memory_op(benchmark, OP, impl, device, "forward+backward")
    assert grads[0].shape == x.shape
