"""multimodal_embed: every backend vs eager (F.embedding + masked_scatter) for an NVLM-D SFT
batch (cases.memory_cases): 8 packed rows x 4096 tokens, 40% of them image placeholders,
vocabulary 152064 (Qwen2), width 8192 on the GPU (72B) and 896 on the CPU (Qwen2-0.5B, so the
fp32 table fits in memory); text ids uniform over the table ("uniform") or as SFT batches have
them ("sft": Zipf-like plus three template ids repeated ~2,000 times each, the table gradient's
long runs). Forward + backward pays the dense table gradient's memset, which caps the speed-up
over eager near 1.2-1.3x (both sides pay it; cases._multimodal_embed_case); "sft-sparse" takes
the table gradient sparse (sparse_grad=True; eager: F.embedding(sparse=True)), which makes no
(V, D) tensor."""

from __future__ import annotations

import pytest

from bench_utils import IMPLEMENTATIONS, bench_memory_op

OP = "multimodal_embed"


IDS = {"uniform": 0, "sft": 1, "sft-sparse": 2}   # index among the op's cases.memory_cases


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_forward(benchmark, device, impl):
    out, (ids, table, _images) = bench_memory_op(benchmark, OP, impl, device, "forward")
    assert out.shape == (*ids.shape, table.shape[1])


@pytest.mark.parametrize("ids", list(IDS))
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_forward_backward(benchmark, device, impl, ids):
    grads, (_ids, table, images) = bench_memory_op(benchmark, OP, impl, device, "forward+backward",
                                                   IDS[ids])
    assert [g.shape for g in grads] == [table.shape, images.shape]
