"""varlen_attention on the Triton backend (GPU, or the interpreter on the CPU: fp32/fp16 there,
bf16 on a GPU) against the float64 reference: packs with empty and odd-length sequences, causal
bottom-right with lq != lk, GQA 1/2/3/7/8, head dims 40/64/80/128, every gradient, poisoned
outputs; every test that computes a result runs over every candidate (attention_candidates.py:
the backward variants and their combinations, and the cards' tiles forced on the interpreter)."""

from __future__ import annotations

import pytest
import torch

import nvlm_kernels as nk
from nvlm_kernels.testing import assert_matches_reference

from attention_candidates import VARLEN

OP = "varlen_attention"
pytestmark = pytest.mark.triton_interpret


@pytest.fixture(params=VARLEN, ids=str)
def candidate(request, device, monkeypatch):
    with request.param.active(monkeypatch, device):
        yield request.param


def cu_seqlens(lengths, device):
    return torch.tensor([0] + list(lengths)).cumsum(0).to(device=device, dtype=torch.int32)


def pack(lengths_q, lengths_k, hq, hk, d, dtype, device, causal):
    return {"q": torch.randn(sum(lengths_q), hq, d).to(device, dtype),
            "k": torch.randn(sum(lengths_k), hk, d).to(device, dtype),
            "v": torch.randn(sum(lengths_k), hk, d).to(device, dtype),
            "cu_seqlens_q": cu_seqlens(lengths_q, device),
            "cu_seqlens_k": cu_seqlens(lengths_k, device),
            "max_seqlen_q": max(lengths_q), "max_seqlen_k": max(lengths_k), "causal": causal}


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hq,hk,d", [(2, 2, 64), (4, 2, 80), (14, 2, 64), (8, 1, 128)])
def test_matches_reference(triton_backend, device, candidate, causal, hq, hk, d):
    lengths = [1, 7, 0, 40, 65]
    for dtype in candidate.dtypes(device):
        inputs = pack(lengths, lengths, hq, hk, d, dtype, device, causal)
        assert_matches_reference(OP, inputs, triton_backend)


@pytest.mark.parametrize("causal", [False, True])
def test_query_and_key_lengths_differ(triton_backend, device, candidate, causal):
    """Bottom-right causal alignment with lq < lk, lq > lk (rows that see no key) and lk = 0;
    GQA 3 at head dim 40 (padded to 64 and masked)."""
    inputs = pack([3, 0, 20, 33, 5], [8, 5, 4, 40, 0], 6, 2, 40, torch.float32, device, causal)
    inputs["softmax_scale"] = 0.3
    assert_matches_reference(OP, inputs, triton_backend)


def test_causal_diagonal_at_every_offset(triton_backend, device, candidate):
    """Bottom-right offsets lk - lq around multiples of the key block (32 on the interpreter, 64
    or 128 on a GPU): the backward runs query blocks unmasked from the first row that sees a
    whole key block, and an off-by-one there shows only at offsets of block - 2 or - 1."""
    shifts = [-2, -1, 1, 30, 31, 33, 62, 63, 126, 127]
    inputs = pack([70] * len(shifts), [70 + s for s in shifts], 2, 1, 32, torch.float32, device,
                  True)
    assert_matches_reference(OP, inputs, triton_backend)


@pytest.mark.parametrize("causal", [False, True])
def test_peaked_scores_with_partial_key_blocks(triton_backend, device, candidate, causal):
    """Whole key blocks run unmasked and only edge blocks mask, so keys past a sequence's end are
    masked where they could matter: with scores far below 0 a padded key's P would overflow
    (exp2(0 - lse)) and turn dQ into NaN (inf * 0) if the edge block skipped its mask."""
    inputs = pack([45, 70], [45, 70], 2, 1, 64, torch.float32, device, causal)
    inputs["q"] = inputs["q"] + 3.0   # q.k about -576: log2-scores near -415 at scale 0.5,
    inputs["k"] = inputs["k"] - 3.0   # so a padded key's exp2(0 - lse) would be inf
    inputs["softmax_scale"] = 0.5
    assert_matches_reference(OP, inputs, triton_backend)


def test_atomic_dq_yields_to_torch_determinism(monkeypatch):
    from nvlm_kernels.ops.varlen_attention import atomic_dq_enabled

    monkeypatch.setenv("NVLM_KERNELS_ATOMIC_DQ", "1")
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        assert not atomic_dq_enabled()
    finally:
        torch.use_deterministic_algorithms(previous)
    monkeypatch.delenv("NVLM_KERNELS_ATOMIC_DQ")
    assert not atomic_dq_enabled()


@pytest.mark.slow
def test_long_pack(triton_backend, device):
    """The issue's pack {1, 7, 64, 129, 1000} with an empty sequence, causal."""
    lengths = [1, 7, 0, 64, 129, 1000]
    inputs = pack(lengths, lengths, 2, 1, 64, torch.float32, device, True)
    assert_matches_reference(OP, inputs, triton_backend)


def test_packed_equals_each_sequence_alone(triton_backend, device, candidate):
    lengths = [5, 0, 33, 17]
    inputs = pack(lengths, lengths, 4, 2, 64, torch.float32, device, True)
    with nk.use_backend(triton_backend):
        packed = nk.varlen_attention(**inputs)
        start = 0
        for length in lengths:
            rows = slice(start, start + length)
            alone = nk.varlen_attention(
                inputs["q"][rows], inputs["k"][rows], inputs["v"][rows],
                cu_seqlens([length], device), cu_seqlens([length], device), length, length,
                causal=True)
            torch.testing.assert_close(packed[rows], alone, rtol=1e-6, atol=1e-6)
            start += length


def test_non_contiguous_inputs(triton_backend, device, candidate):
    lengths = [6, 11]
    q = torch.randn(17, 64, 4, device=device).transpose(1, 2)          # (17, 4, 64), strided
    kv = torch.randn(17, 2, 2, 64, device=device)
    inputs = {"q": q, "k": kv[:, 0], "v": kv[:, 1], "cu_seqlens_q": cu_seqlens(lengths, device),
              "cu_seqlens_k": cu_seqlens(lengths, device), "max_seqlen_q": 11, "max_seqlen_k": 11}
    assert not q.is_contiguous() and not inputs["k"].is_contiguous()
    assert_matches_reference(OP, inputs, triton_backend)


def test_bad_cu_seqlens_never_address_outside_the_tensors(triton_backend, device):
    """Without validation (a GPU without NVLM_KERNELS_DEBUG) offsets past the totals are clamped."""
    q, k, v = (torch.randn(10, 2, 16, device=device) for _ in range(3))
    bad = torch.tensor([0, 4, 1000], dtype=torch.int32, device=device)
    out, _lse = torch.ops.nvlm_triton.varlen_attention(q, k, v, bad, bad, 1000, 1000, 0.25, True)
    clamped = cu_seqlens([4, 6], device)
    expected = nk.reference.varlen_attention(q, k, v, clamped, clamped, 6, 6, 0.25, True)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_double_backward_is_refused(triton_backend, device):
    inputs = pack([5], [5], 2, 2, 16, torch.float32, device, False)
    inputs["q"].requires_grad_(True)
    with nk.use_backend(triton_backend):
        out = nk.varlen_attention(**inputs)
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(out.square().sum(), inputs["q"], create_graph=True)


def test_torch_compile_without_graph_breaks(triton_backend, device, candidate):
    inputs = pack([3, 9], [3, 9], 2, 1, 32, torch.float32, device, True)
    for name in ("q", "k", "v"):
        inputs[name].requires_grad_(True)

    def attention_block(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal):
        out = nk.varlen_attention(q * 1.5, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                  max_seqlen_k, causal=causal)
        return out.relu()

    torch._dynamo.reset()
    with nk.use_backend(triton_backend):
        out = torch.compile(attention_block, fullgraph=True, backend="aot_eager")(**inputs)
        grads = torch.autograd.grad(out.sum(), (inputs["q"], inputs["k"], inputs["v"]))
    with nk.use_backend("torch"):
        expected = attention_block(**inputs)
    expected_grads = torch.autograd.grad(expected.sum(), (inputs["q"], inputs["k"], inputs["v"]))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
