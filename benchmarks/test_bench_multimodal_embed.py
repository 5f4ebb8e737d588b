"""multimodal_embed: every backend vs eager (F.embedding + masked_scatter) for an NVLM-D SFT
batch (cases.memory_cases): 8 packed rows x 4096 tokens, 40% of them image placeholders,
vocabulary 152064 (Qwen2), width 8192 on the GPU (72B) and 896 on the CPU (Qwen2-0.5B, so the
fp32 table fits in memory). Forward + backward pays the dense table gradient's memset, which caps
the speed-up over eager (both sides pay it)."""

from __future__ import annotations

import pytest

from bench_utils import IMPLEMENTATIONS, bench_memory_op

OP = "multimodal_embed"


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_forward(benchmark, device, impl):
    out, (ids, table, _images) = bench_memory_op(benchmark, OP, impl, device, "forward")
    assert out.shape == (*ids.shape, table.shape[1])


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_forward_backward(benchmark, device, impl):
    grads, (_ids, table, images) = bench_memory_op(benchmark, OP, impl, device, "forward+backward")
    assert [g.shape for g in grads] == [table.shape, images.shape]
