"""cross_attention on the Triton backend (GPU, or the interpreter on the CPU: fp32/fp16 there,
bf16 on a GPU) against the float64 dense masked reference: random ranges with empty, single-key,
overlapping and full-memory rows, NVLM-X/H ranges from cross_attention_ranges, GQA, head dims,
gate None / number / 1-element / per head (including the fresh gate 0), every gradient. Every
test that computes a result runs over every candidate (attention_candidates.py: the cards' tiles
forced on every launch, which the interpreter otherwise never runs)."""

from __future__ import annotations

import pytest
import torch

import nvlm_kernels as nk
from nvlm_kernels.testing import assert_matches_reference

from attention_candidates import CROSS
from test_ranges import build_layout

OP = "cross_attention"
pytestmark = pytest.mark.triton_interpret


@pytest.fixture(params=CROSS, ids=str)
def candidate(request, device, monkeypatch):
    with request.param.active(monkeypatch, device):
        yield request.param


def random_ranges(total_q: int, total_kv: int, generator: torch.Generator):
    """Every kind of row: empty (also at the memory's ends), one key, the full memory, short and
    long overlapping ranges, and runs of rows sharing one range (the common case in NVLM)."""
    start = torch.randint(0, total_kv + 1, (total_q,), generator=generator)
    length = torch.randint(0, total_kv + 1, (total_q,), generator=generator)
    end = torch.minimum(start + length, torch.tensor(total_kv))
    kinds = torch.randint(0, 6, (total_q,), generator=generator)
    start = torch.where(kinds == 0, end, start)                                 # empty
    end = torch.where(kinds == 1, torch.clamp(start + 1, max=total_kv), end)    # one key
    start = torch.where(kinds == 2, torch.zeros_like(start), start)             # full memory
    end = torch.where(kinds == 2, torch.full_like(end, total_kv), end)
    start = torch.minimum(start, end)
    shared = slice(total_q // 3, total_q // 3 + 12)                             # a shared run
    start[shared], end[shared] = total_kv // 4, total_kv // 4 + total_kv // 2
    start[0], end[0] = total_kv, total_kv                                       # empty at the end
    return start.to(torch.int32), end.to(torch.int32)


def make_inputs(total_q, total_kv, hq, hk, d, dtype, device, gate="heads", seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)  # noqa: E731
    start, end = random_ranges(total_q, total_kv, g)
    inputs = {"q": r(total_q, hq, d), "k": r(total_kv, hk, d), "v": r(total_kv, hk, d),
              "kv_start": start.to(device), "kv_end": end.to(device)}
    if gate == "heads":
        inputs["gate"] = torch.randn(hq, generator=g).to(device, dtype)
    elif gate == "scalar":
        inputs["gate"] = torch.randn(1, generator=g).to(device, dtype)
    elif gate == "number":
        inputs["gate"] = -0.7
    elif gate == "zero":
        inputs["gate"] = torch.zeros((), device=device, dtype=dtype)
    return inputs


@pytest.mark.parametrize("hq,hk,d", [(2, 2, 64), (4, 2, 80), (14, 2, 64), (8, 1, 128)])
def test_random_ranges_match_reference(triton_backend, device, candidate, hq, hk, d):
    for dtype in candidate.dtypes(device):
        assert_matches_reference(OP, make_inputs(70, 53, hq, hk, d, dtype, device), triton_backend)


@pytest.mark.parametrize("gate", [None, "scalar", "number", "zero"])
def test_gate_forms(triton_backend, device, candidate, gate):
    """The fresh gate tanh(0) = 0 zeroes the output but not the gate's own gradient."""
    inputs = make_inputs(45, 38, 4, 2, 32, torch.float32, device, gate=gate, seed=1)
    comparison = assert_matches_reference(OP, inputs, triton_backend)
    if gate == "zero":
        measured = {m.name for m in comparison.measurements}
        assert "grad gate" in measured
        with nk.use_backend(triton_backend):
            gate_tensor = inputs["gate"].clone().requires_grad_(True)
            out = nk.cross_attention(**{**inputs, "gate": gate_tensor})
            (grad,) = torch.autograd.grad(out.square().sum() + out.sum(), gate_tensor)
        assert float(out.detach().abs().max()) == 0.0
        assert float(grad.abs()) > 0.0


def test_whole_and_edge_key_blocks(triton_backend, device, candidate):
    """Query blocks whose non-empty rows share a start run their whole key blocks unmasked and
    mask only the edge: empty rows in such a block (they take unmasked work) must still give 0,
    rows that end at different keys, a row that starts later (no unmasked blocks), and scores
    peaked far below 0 where a padded key's P would overflow."""
    total_q, total_kv = 128, 200
    start = torch.zeros(total_q, dtype=torch.int32)
    end = torch.zeros(total_q, dtype=torch.int32)
    start[8:32], end[8:32] = 10, 150                       # rows 0-7 empty
    start[32:64], end[32:64] = 40, torch.arange(100, 196, 3, dtype=torch.int32)
    start[64:96], end[64:96] = 0, total_kv
    start[70], end[70] = 5, total_kv                       # one row starts later
    start[96:128], end[96:128] = 190, 197                  # less than one block
    for peaked in (False, True):
        inputs = make_inputs(total_q, total_kv, 4, 2, 64, torch.float32, device, seed=3)
        inputs.update(kv_start=start.to(device), kv_end=end.to(device))
        if peaked:  # q.k about -576: log2-scores near -415, a padded key's exp2(0 - lse) = inf
            inputs.update(q=inputs["q"] + 3.0, k=inputs["k"] - 3.0, softmax_scale=0.5)
        assert_matches_reference(OP, inputs, triton_backend)


@pytest.mark.parametrize("arch", ["X", "H"])
def test_nvlm_ranges_match_reference(triton_backend, device, candidate, arch):
    """Ranges as the model builds them: two samples, three images, tag tokens per tile (X)."""
    samples = [[("text", 3), ("image", 3), ("text", 20), ("image", 2), ("text", 9)],
               [("text", 5), ("image", 4), ("text", 30)]]
    sample, image, mem, tile, tile_off, _rule = build_layout(samples, tokens_per_tile=7)
    kwargs = {"tile_index": tile, "tile_offsets": tile_off} if arch == "X" else {}
    kv_start, kv_end = nk.cross_attention_ranges(sample, image, mem, **kwargs)
    total_q, total_kv = sample.numel(), int(mem[-1])
    g = torch.Generator().manual_seed(2)
    for dtype in candidate.dtypes(device):
        r = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)  # noqa: E731
        inputs = {"q": r(total_q, 8, 64), "k": r(total_kv, 2, 64), "v": r(total_kv, 2, 64),
                  "kv_start": kv_start.to(device), "kv_end": kv_end.to(device),
                  "gate": r(1)}
        assert_matches_reference(OP, inputs, triton_backend)


def test_empty_memory_and_empty_queries(triton_backend, device):
    q = torch.randn(6, 2, 16, device=device)
    no_memory = torch.zeros(0, 2, 16, device=device)
    zeros = torch.zeros(6, dtype=torch.int32, device=device)
    with nk.use_backend(triton_backend):
        out = nk.cross_attention(q, no_memory, no_memory, zeros, zeros)
        assert out.shape == q.shape and float(out.abs().max()) == 0.0
        k = torch.randn(5, 2, 16, device=device)
        none = torch.zeros(0, dtype=torch.int32, device=device)
        assert nk.cross_attention(q[:0], k, k, none, none).shape == (0, 2, 16)


def test_non_contiguous_inputs(triton_backend, device, candidate):
    q = torch.randn(17, 64, 4, device=device).transpose(1, 2)          # (17, 4, 64), strided
    kv = torch.randn(23, 2, 2, 64, device=device)
    g = torch.Generator().manual_seed(3)
    start, end = random_ranges(17, 23, g)
    inputs = {"q": q, "k": kv[:, 0], "v": kv[:, 1], "kv_start": start.to(device),
              "kv_end": end.to(device), "gate": torch.randn(4, device=device)}
    assert not q.is_contiguous() and not inputs["k"].is_contiguous()
    assert_matches_reference(OP, inputs, triton_backend)


def test_bad_ranges_never_address_outside_the_memory(triton_backend, device, candidate):
    """Without validation (a GPU without NVLM_KERNELS_DEBUG) ranges are clamped into the memory,
    and start > end reads as empty."""
    q, k, v = torch.randn(4, 2, 16, device=device), *(torch.randn(9, 2, 16, device=device)
                                                      for _ in range(2))
    start = torch.tensor([-50, 3, 7, 2], dtype=torch.int32, device=device)
    end = torch.tensor([4, 1000, 5, 2**31 - 1], dtype=torch.int32, device=device)
    out, _lse, _ungated = torch.ops.nvlm_triton.cross_attention(q, k, v, start, end, None, 0.25,
                                                               False)
    clamped_start = torch.tensor([0, 3, 7, 2], dtype=torch.int32, device=device)
    clamped_end = torch.tensor([4, 9, 7, 9], dtype=torch.int32, device=device)
    expected = nk.reference.cross_attention(q, k, v, clamped_start, clamped_end, 0.25)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_double_backward_is_refused(triton_backend, device):
    inputs = make_inputs(5, 4, 2, 2, 16, torch.float32, device)
    inputs["q"].requires_grad_(True)
    with nk.use_backend(triton_backend):
        out = nk.cross_attention(**inputs)
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(out.square().sum(), inputs["q"], create_graph=True)


def test_torch_compile_without_graph_breaks(triton_backend, device, candidate):
    inputs = make_inputs(19, 12, 4, 2, 32, torch.float32, device)
    for name in ("q", "k", "v", "gate"):
        inputs[name].requires_grad_(True)
    leaves = (inputs["q"], inputs["k"], inputs["v"], inputs["gate"])

    def gated_block(q, k, v, kv_start, kv_end, gate):
        return nk.cross_attention(q * 1.5, k, v, kv_start, kv_end, gate=gate).relu()

    torch._dynamo.reset()
    with nk.use_backend(triton_backend):
        out = torch.compile(gated_block, fullgraph=True, backend="aot_eager")(**inputs)
        grads = torch.autograd.grad(out.sum(), leaves)
    with nk.use_backend("torch"):
        expected = gated_block(**inputs)
    expected_grads = torch.autograd.grad(expected.sum(), leaves)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def _expected_spans(start, end, total_kv, block_m, block_n):
    """[first, last) per key block: the query blocks whose rows' union of non-empty ranges,
    clamped as the kernels clamp them, overlaps the key block."""
    lo = start.clamp(0, total_kv)
    hi = torch.maximum(end.clamp(max=total_kv), lo)
    query_blocks = -(-start.numel() // block_m)
    unions = []
    for b in range(query_blocks):
        rows = slice(b * block_m, (b + 1) * block_m)
        nonempty = lo[rows] < hi[rows]
        unions.append((int(lo[rows][nonempty].min()) if nonempty.any() else total_kv,
                       int(hi[rows][nonempty].max()) if nonempty.any() else 0))
    spans = []
    for key_lo in range(0, total_kv, block_n):
        reaching = [b for b, (u_lo, u_hi) in enumerate(unions)
                    if u_lo < key_lo + block_n and u_hi > key_lo]
        spans.append((min(reaching, default=query_blocks), max(reaching, default=-1) + 1))
    return spans


@pytest.mark.parametrize("block_m,block_n", [(16, 32), (64, 64)])
def test_query_block_spans(triton_backend, device, block_m, block_n):
    """The dK/dV pass's span of query blocks per key block (one Triton launch) against the rule
    computed here with torch. Random, empty, reversed and out-of-range ranges over more query
    blocks than one step of the kernel reads; then windows sliding by 4 keys per query block,
    whose unions start and end exactly on key block boundaries."""
    from nvlm_kernels.ops.cross_attention import _query_block_spans

    total_kv = 300
    g = torch.Generator().manual_seed(block_m)
    start = torch.randint(-20, total_kv + 20, (1000,), generator=g)
    end = start + torch.randint(-5, 60, (1000,), generator=g)
    start[100:300], end[100:300] = 40, 40                  # a run of empty ranges
    windows = torch.arange(40 * block_m - 3) // block_m * 4
    for start, end in ((start, end), (windows, windows + block_n)):
        start, end = start.to(torch.int32), end.to(torch.int32)
        first, last = _query_block_spans(start.to(device), end.to(device), total_kv, block_m,
                                         block_n)
        expected = _expected_spans(start, end, total_kv, block_m, block_n)
        assert list(zip(first.tolist(), last.tolist())) == expected
        assert any(f < la for f, la in expected)   # not all empty
