"""varlen_attention on the native backend's CPU path (aten's fused attention, batched over runs
of equal-length sequences) against the float64 reference: every gradient, poisoned outputs."""

from __future__ import annotations

import pytest
import torch

import nvlm_kernels as nk
from nvlm_kernels.testing import assert_matches_reference, backend_unavailable_reason

OP = "varlen_attention"


@pytest.fixture(autouse=True)
def _native_available():
    reason = backend_unavailable_reason("native", OP, "cpu", torch.float32)
    if reason:
        pytest.skip(reason)


def pack(lengths_q, lengths_k, hq, hk, d, dtype, causal):
    def cu(lengths):
        return torch.tensor([0] + list(lengths)).cumsum(0).to(torch.int32)

    return {"q": torch.randn(sum(lengths_q), hq, d, dtype=dtype),
            "k": torch.randn(sum(lengths_k), hk, d, dtype=dtype),
            "v": torch.randn(sum(lengths_k), hk, d, dtype=dtype),
            "cu_seqlens_q": cu(lengths_q), "cu_seqlens_k": cu(lengths_k),
            "max_seqlen_q": max(lengths_q), "max_seqlen_k": max(lengths_k), "causal": causal}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hq,hk,d", [(2, 2, 64), (14, 2, 80), (3, 1, 32)])
def test_mixed_pack_matches_reference(dtype, causal, hq, hk, d):
    # equal-length runs (batched), singletons, an empty sequence, lengths 1 and 129
    lengths = [7, 7, 7, 0, 1, 129, 64, 64, 3]
    assert_matches_reference(OP, pack(lengths, lengths, hq, hk, d, dtype, causal), "native")


@pytest.mark.parametrize("causal", [False, True])
def test_query_and_key_lengths_differ(causal):
    lengths_q, lengths_k = [5, 5, 9, 3, 0, 4], [5, 5, 4, 8, 6, 0]
    assert_matches_reference(OP, pack(lengths_q, lengths_k, 4, 2, 32, torch.float32, causal),
                             "native")


def test_vit_tiles_in_one_batched_call_equal_reference():
    inputs = pack([65] * 12, [65] * 12, 4, 4, 32, torch.float32, False)
    with nk.use_backend("native"):
        got = nk.varlen_attention(**inputs)
    with nk.use_backend("torch"):
        want = nk.varlen_attention(**inputs)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("poisoned", ["q", "k", "v"])
def test_non_finite_inputs_propagate_as_in_reference(poisoned, value, causal):
    # With fewer keys than its vector width (16 floats with AVX-512) aten's CPU kernel returned 0
    # for a query row of NaN scores, or of only -inf, where the reference gives NaN.
    lengths = list(range(1, 9)) + [17]
    inputs = pack(lengths, lengths, 2, 2, 32, torch.float32, causal)
    start = 0
    for length in lengths:
        inputs[poisoned][start + length // 2, 0, 3] = value
        start += length
    with nk.use_backend("native"):
        got = nk.varlen_attention(**inputs)
    want = nk.reference.varlen_attention(
        **{name: x.double() if name in "qkv" else x for name, x in inputs.items()})
    assert not want.isfinite().all()
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5, equal_nan=True)
