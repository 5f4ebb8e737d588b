"""pixel_shuffle_layernorm: every backend vs eager (view/permute/contiguous + F.layer_norm) at
NVLM's shape (cases.memory_cases): 7 tiles x 1024 InternViT-6B tokens x 3200 channels -> 7 x 256
x 12800."""

from __future__ import annotations

import pytest

from bench_utils import IMPLEMENTATIONS, bench_memory_op

OP = "pixel_shuffle_layernorm"


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_forward(benchmark, device, impl):
    out, (x, weight, _bias) = bench_memory_op(benchmark, OP, impl, device, "forward")
    assert out.shape == (x.shape[0], x.shape[1] // 4, weight.shape[0])


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_forward_backward(benchmark, device, impl):
    grads, (x, weight, bias) = bench_memory_op(benchmark, OP, impl, device, "forward+backward")
    assert [g.shape for g in grads] == [x.shape, weight.shape, bias.shape]
