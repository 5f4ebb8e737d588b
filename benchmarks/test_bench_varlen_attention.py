"""varlen_attention (bf16, GPU): Triton vs the baselines present on the card, forward and
forward+backward, on the packs of benchmarks/cases.py (NVLM-D SFT rows, causal, head dim 128 and
64 with GQA 4 and 7; the ViT's 7 x 1024 tiles, non-causal).
"triton" runs the shipped configurations, "triton_tuned" the tuner's picks among their candidates
(nk.autotuning; the picks are in the row's extra_info "configs"), "triton_atomic_dq" (backward
only) adds dQ with atomics from the dK/dV pass instead of a second pass, "triton_kq" (backward
only) runs the dK/dV pass with keys on M (S^T = K Q^T), "triton_split_group" (backward only, GQA
packs) runs one dK/dV program per query head and sums the group's shares, "triton_kq_split_group"
both, with no mask below the causal diagonal.
Baselines (cases.VARLEN_BASELINES): torch's varlen_attn (FlashAttention-2), a per-sequence SDPA
loop, SDPA on a padded batch, FlexAttention with a document mask built once, and
flash_attn_varlen_func where installed. FLOPs count only unmasked work.
The one-shot GPU check (gpu_check.py) times the same cases with CUDA graphs; these pytest rows
are wall-clock around a synchronize, so small packs read slower than they are.
"""

from __future__ import annotations

import pytest
import torch

import nvlm_kernels as nk
from bench_utils import TRITON_VARIANTS, synchronized, triton_mode, tune_before_timing
from cases import VARLEN_BASELINES, VARLEN_PACKS, Unavailable, varlen_baseline, varlen_inputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmark")

IMPLS = ["triton", "triton_tuned", *VARLEN_BASELINES]


def implementation(impl, pack):
    if impl.startswith("triton"):  # its variants are settings around the step (triton_mode)
        def run(**inputs):
            with nk.use_backend("triton"):
                return nk.varlen_attention(**inputs)
        return run
    try:
        return varlen_baseline(impl, pack, "cuda")
    except Unavailable as exc:
        pytest.skip(str(exc))


def record(benchmark, pack, impl, mode):
    benchmark.group = f"varlen_attention {mode} {pack.name}"
    benchmark.extra_info.update(op="varlen_attention", mode=mode, impl=impl, device="cuda",
                                dtype="torch.bfloat16", shape=pack.name,
                                flops=pack.useful_flops(mode))


@pytest.mark.parametrize("name", list(VARLEN_PACKS))
@pytest.mark.parametrize("impl", IMPLS)
def test_forward(benchmark, name, impl):
    pack = VARLEN_PACKS[name]
    inputs = varlen_inputs(pack, "cuda", torch.bfloat16)
    fn = implementation(impl, pack)
    record(benchmark, pack, impl, "forward")

    def forward():
        with triton_mode(impl):
            return fn(**inputs)

    tune_before_timing(benchmark, impl, forward)
    out = benchmark(synchronized(forward, "cuda"))
    assert out.shape == inputs["q"].shape


@pytest.mark.parametrize("name", list(VARLEN_PACKS))
@pytest.mark.parametrize("impl", IMPLS + list(TRITON_VARIANTS))
def test_forward_backward(benchmark, name, impl):
    pack = VARLEN_PACKS[name]
    inputs = varlen_inputs(pack, "cuda", torch.bfloat16, requires_grad=True)
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    fn = implementation(impl, pack)
    grad = torch.randn_like(q)
    record(benchmark, pack, impl, "forward+backward")

    def step():
        with triton_mode(impl):
            return torch.autograd.grad(fn(**inputs), (q, k, v), grad)

    tune_before_timing(benchmark, impl, step)
    grads = benchmark(synchronized(step, "cuda"))
    assert grads[0].shape == q.shape
