"""varlen_attention (bf16, GPU): Triton vs the baselines present on the card, forward and
forward+backward, on two realistic packs:
  (a) NVLM-D SFT rows of 3200 tokens holding samples of mixed length (256..1792 image tokens +
      text), causal; head dim 128 (32 query / 8 key heads) and 64 (14 / 2, Qwen2-0.5B);
  (b) the ViT: 7 tiles x 1024 tokens, non-causal, 25 heads x 128 (InternViT-6B).
"triton" runs the shipped configurations, "triton_tuned" the tuner's picks among their candidates
(nk.autotuning; the picks are in the row's extra_info "configs"), "triton_atomic_dq" (backward
only) adds dQ with atomics from the dK/dV pass instead of a second pass.
Baselines: a per-sequence SDPA loop, SDPA on a padded batch, torch.nn.attention.varlen.varlen_attn
and flash_attn_varlen_func where importable, FlexAttention with a document mask built once.
FLOPs count only unmasked work (report.py turns them into TFLOP/s and % of the bf16 matmul rate).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

import nvlm_kernels as nk
from bench_utils import synchronized, triton_mode, tune_before_timing

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmark")

PACKS = {
    # name: (sequence lengths, Hq, Hkv, head dim, causal)
    "sft-d128": ([2400, 800, 1500, 1100, 600, 2000, 1200], 32, 8, 128, True),
    "sft-d64": ([2400, 800, 1500, 1100, 600, 2000, 1200], 14, 2, 64, True),
    "vit-7x1024": ([1024] * 7, 25, 25, 128, False),
}
IMPLS = ["triton", "triton_tuned", "sdpa_loop", "sdpa_padded", "flex", "torch_varlen", "flash_attn"]


def useful_flops(lengths, heads, head_dim, causal) -> int:
    pairs = sum(n * (n + 1) // 2 if causal else n * n for n in lengths)
    return 4 * pairs * heads * head_dim  # QK^T and PV, 2 flops per multiply-add


def make_inputs(pack, requires_grad):
    lengths, hq, hk, d, causal = PACKS[pack]
    total = sum(lengths)
    q, k, v = (torch.randn(total, h, d, device="cuda", dtype=torch.bfloat16,
                           requires_grad=requires_grad) for h in (hq, hk, hk))
    cu = torch.tensor([0] + lengths, device="cuda").cumsum(0).int()
    return q, k, v, cu, max(lengths), causal


def implementation(impl, pack):
    lengths, hq, hk, d, causal = PACKS[pack]
    groups = hq // hk
    if impl.startswith("triton"):  # its variants are settings around the step (triton_mode)
        def run(q, k, v, cu, max_len, causal):
            with nk.use_backend("triton"):
                return nk.varlen_attention(q, k, v, cu, cu, max_len, max_len, causal=causal)
        return run
    if impl == "sdpa_loop":
        def run(q, k, v, cu, max_len, causal):
            outs, start = [], 0
            for n in lengths:
                qs, ks, vs = (t[start:start + n].transpose(0, 1) for t in (q, k, v))
                outs.append(F.scaled_dot_product_attention(
                    qs, ks, vs, is_causal=causal, enable_gqa=groups > 1).transpose(0, 1))
                start += n
            return torch.cat(outs)
        return run
    if impl == "sdpa_padded":
        batch, longest = len(lengths), max(lengths)
        positions = torch.cat([torch.arange(n, device="cuda") for n in lengths])
        rows = torch.repeat_interleave(torch.arange(batch, device="cuda"),
                                       torch.tensor(lengths, device="cuda"))

        def run(q, k, v, cu, max_len, causal):
            def padded(t):
                out = t.new_zeros(batch, longest, t.shape[1], t.shape[2])
                out[rows, positions] = t
                return out.transpose(1, 2)
            out = F.scaled_dot_product_attention(padded(q), padded(k), padded(v), is_causal=causal,
                                                 enable_gqa=groups > 1)
            return out.transpose(1, 2)[rows, positions]
        return run
    if impl == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        document = torch.repeat_interleave(torch.arange(len(lengths), device="cuda"),
                                           torch.tensor(lengths, device="cuda"))
        total = sum(lengths)

        def mask_mod(b, h, q_idx, kv_idx):
            same = document[q_idx] == document[kv_idx]
            return same & (kv_idx <= q_idx) if causal else same

        block_mask = create_block_mask(mask_mod, None, None, total, total, device="cuda")
        flex = torch.compile(flex_attention)

        def run(q, k, v, cu, max_len, causal):
            out = flex(*(t.transpose(0, 1)[None] for t in (q, k, v)), block_mask=block_mask,
                       enable_gqa=groups > 1)
            return out[0].transpose(0, 1)
        return run
    if impl == "torch_varlen":
        if importlib.util.find_spec("torch.nn.attention.varlen") is None:
            pytest.skip("torch.nn.attention.varlen is not in this torch")
        from torch.nn.attention.varlen import varlen_attn

        def run(q, k, v, cu, max_len, causal):
            if groups > 1:  # varlen_attn takes equal head counts
                k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
            return varlen_attn(q, k, v, cu, cu, max_len, max_len, is_causal=causal)
        return run
    if impl == "flash_attn":
        if importlib.util.find_spec("flash_attn") is None:
            pytest.skip("flash_attn is not installed")
        from flash_attn import flash_attn_varlen_func

        def run(q, k, v, cu, max_len, causal):
            return flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=causal)
        return run
    raise ValueError(impl)


def record(benchmark, pack, impl, mode, flops):
    lengths, hq, _hk, d, _causal = PACKS[pack]
    benchmark.group = f"varlen_attention {mode} {pack}"
    benchmark.extra_info.update(op="varlen_attention", mode=mode, impl=impl, device="cuda",
                                dtype="torch.bfloat16", shape=pack, flops=flops)


@pytest.mark.parametrize("pack", list(PACKS))
@pytest.mark.parametrize("impl", IMPLS)
def test_forward(benchmark, pack, impl):
    q, k, v, cu, max_len, causal = make_inputs(pack, requires_grad=False)
    fn = implementation(impl, pack)
    lengths, hq, _hk, d, _ = PACKS[pack]
    record(benchmark, pack, impl, "forward", useful_flops(lengths, hq, d, causal))

    def forward():
        with triton_mode(impl):
            return fn(q, k, v, cu, max_len, causal)

    tune_before_timing(benchmark, impl, forward)
    out = benchmark(synchronized(forward, "cuda"))
    assert out.shape == q.shape


@pytest.mark.parametrize("pack", list(PACKS))
@pytest.mark.parametrize("impl", IMPLS + ["triton_atomic_dq"])
def test_forward_backward(benchmark, pack, impl):
    q, k, v, cu, max_len, causal = make_inputs(pack, requires_grad=True)
    fn = implementation(impl, pack)
    lengths, hq, _hk, d, _ = PACKS[pack]
    grad = torch.randn_like(q)
    # backward does 2.5x the forward's matmul work (dV, dP, dQ, dK + the recomputed QK^T)
    record(benchmark, pack, impl, "forward+backward", int(3.5 * useful_flops(lengths, hq, d, causal)))

    def step():
        with triton_mode(impl):
            return torch.autograd.grad(fn(q, k, v, cu, max_len, causal), (q, k, v), grad)

    tune_before_timing(benchmark, impl, step)
    grads = benchmark(synchronized(step, "cuda"))
    assert grads[0].shape == q.shape
