"""Triton variable-length flash attention over packed sequences, forward and backward.

Layout as flash-attention: q (total_q, Hq, d), k/v (total_k, Hkv, d), int32 cu_seqlens. Programs
run over (query block, sequence, head); each reads its sequence's bounds from cu_seqlens on the
device (clamped to the totals, so bad contents never address outside the tensors), and a block
past its sequence's end exits at once, so the only host-side size is the given max_seqlen.

Forward: online softmax in fp32 (exp2 with log2(e) folded into the scale); causal masks align
bottom-right (query i of lq sees key j <= i + lk - lq), key blocks entirely above the diagonal
are never visited and those below it run without masks; GQA maps query head h to key head
h // (Hq / Hkv) without copying K/V; the log-sum-exp of each row is saved (+inf for a row that
sees no key, whose output is 0).

Backward: D = rowsum(O * dO) first (a small kernel); then dK/dV in one pass over key blocks
(each program owns a key block of one key head and loops over the query heads of its GQA group
and the query blocks that see it) and dQ in a second pass over query blocks. Two passes recompute
Q K^T and dO V^T twice, against atomics on dQ (flash-attention 2's choice), which make results
vary run to run in the last bits and need an fp32 dQ buffer (4 bytes x total_q x Hq x d) plus a
copy. The deterministic form is the default; NVLM_KERNELS_ATOMIC_DQ=1 selects the atomic one
(the dK/dV pass adds dS K into the fp32 buffer, and the dQ pass is skipped), so that both can be
measured on a card: the benchmark's "triton" and "triton_atomic_dq" rows. (No GPU run yet.)

NVLM_KERNELS_KEYS_ON_M=1 runs the dK/dV pass transposed (_attention_core.dkdv_step_keys_on_m:
S^T = K Q^T, 128 keys on the M side of every dot on sm_90, head dims <= 128), a candidate beside
the default ("triton_kq" rows). Prediction, to be confirmed or refuted by the GPU run: the default
pass transposes P and dS in registers for its dV and dK dots, which on Hopper goes through shared
memory, and at BLOCK_M = 32 two of its four dots fall back to mma.sync (the compile gate counts
them); dK/dV is 4 of the backward's 7 GEMM units. If those cost what a read-through estimated
(the backward at 45-70 % of FlashAttention-2's speed at d = 128, 35-40 % for Qwen2-0.5B's GQA-7
d = 64 pack), the keys-on-M pass should make the backward 1.2-1.4x faster at d = 128. It does not
touch the GQA work balance (one program still loops over its whole group); the split-group form
below does.

NVLM_KERNELS_SPLIT_GROUP=1 (GQA only) runs the dK/dV pass with one program per query head instead
of one per KV head looping over its group: each writes its head's share of dK/dV in fp32
((total_k, Hq, d)), and torch sums the G shares of each KV head in a fixed order (deterministic).
Prediction, for the GPU run to confirm or refute: at Qwen2-0.5B's GQA 7 the default launches
2/14 as many programs, each 7x longer, and a causal key block 0 does twice the average block's
work, so the last wave runs mostly idle; split, the pass should run 1.5-2x faster (and at 212
rather than 253 registers at d = 64; at d = 128 GQA 7 it removes a 56-byte spill: the compile
gate, sm_90, triton 3.9). Against that, the shares cost 2 x 4 x total_k x Hq x d bytes written
and read (8k keys x 14 heads x 64: ~120 MB, ~40 us on an H100), so the backward as a whole
should gain 1.1-1.3x on that pack and less at GQA 4 over longer heads.

With both switches (keys on M and split group) the causal dK/dV programs also skip the mask on
the query blocks below the diagonal (INTERIOR_UNMASKED), which only those programs can afford in
registers (188 / 219 at d = 64 / 128, GQA 7, no spills; all 8 dots on wgmma): the GPU check's
"triton_kq_split_group" rows, predicted the fastest backward on the causal GQA packs.

Causal forward and dQ programs take their query blocks last-first (_query_block_index): a
block's work grows with its index, so the heaviest start first and light ones fill the grid's
tail, as in flash-attention 2. The dK/dV pass needs no reordering: its key block 0, which every
query sees, is already first. The backward allocates dQ, dK and dV without a memset: its kernels
write every row of every sequence.

The loops themselves (online softmax, softmax backward, dK/dV and dQ accumulation) live in
_attention_core.py and are shared with cross-attention: this module only turns cu_seqlens and the
causal rule into per-row key bounds and launches the programs.

fp32 inputs use IEEE-precision dots (no tf32), so fp32 meets the 1e-4 reference tolerance;
fp16/bf16 dots accumulate in fp32. Head dims are padded to the next power of two (>= 16) and
masked, so every d <= 256 works; 64 and 128 need no padding.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .._memory import new_output
from ..reference import softmax_scale_or_default
from .._registration import register_varlen_attention
from ._attention_core import (DELTA_ROWS, LOG2E, attend, check_grid, delta_kernel, dkdv_step,
                              dkdv_step_keys_on_m, dot, dq_block, head_dim_padded,
                              keys_visible_to_rows, launch_tuned, load_query_block, load_rows,
                              loop_bounds, store_rows, unit_last_stride, visible_keys)


@triton.jit
def _sequence_bounds(cu_ptr, sequence, total):
    """(start, length) of `sequence`, clamped into [0, total] whatever cu_seqlens holds."""
    start = tl.minimum(tl.maximum(tl.load(cu_ptr + sequence), 0), total)
    end = tl.minimum(tl.maximum(tl.load(cu_ptr + sequence + 1), start), total)
    return start, end - start


@triton.jit
def _row_key_bounds(rows, q_len, k_len, CAUSAL: tl.constexpr):
    """Row i of a sequence sees keys [0, k_len), causal: [0, i + k_len - q_len] (bottom-right);
    rows past the sequence see nothing. Keys past the block's last visible key are never loaded."""
    row_hi = tl.where(rows < q_len, k_len, 0)
    if CAUSAL:
        row_hi = tl.maximum(tl.minimum(row_hi, rows + (k_len - q_len) + 1), 0)
    return tl.zeros_like(row_hi), row_hi


@triton.jit
def _query_block_index(CAUSAL: tl.constexpr):
    """This program's query block. Causal: the last blocks first, since a causal query block's
    work grows with its index and programs start in launch order: the heaviest start first and
    the light ones fill the tail of the grid (flash-attention 2's order)."""
    if CAUSAL:
        return tl.num_programs(0) - 1 - tl.program_id(0)
    return tl.program_id(0)


@triton.jit
def _attn_fwd_kernel(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, cu_q_ptr, cu_k_ptr,
                     stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_ot, stride_oh, total_q, total_k, head_dim, qk_scale_log2,
                     GROUP: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE_DOTS: tl.constexpr):
    block_m = _query_block_index(CAUSAL)
    sequence = tl.program_id(1)
    head = tl.program_id(2)
    q_start, q_len = _sequence_bounds(cu_q_ptr, sequence, total_q)
    if block_m * BLOCK_M < q_len:
        k_start, k_len = _sequence_bounds(cu_k_ptr, sequence, total_k)
        kv_head = head // GROUP
        rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, HEAD_DIM)
        dim_mask = dims < head_dim
        mask = (rows < q_len)[:, None] & dim_mask[None, :]
        q_base = q_start.to(tl.int64) * stride_qt + head * stride_qh
        q = load_rows(q_ptr + q_base, rows, stride_qt, dims, mask)
        row_lo, row_hi = _row_key_bounds(rows, q_len, k_len, CAUSAL)
        key_lo, key_hi = loop_bounds(row_lo, row_hi, k_len)
        k_base = k_start.to(tl.int64)
        out, lse = attend(q, k_ptr + k_base * stride_kt + kv_head * stride_kh,
                          v_ptr + k_base * stride_vt + kv_head * stride_vh, stride_kt, stride_vt,
                          row_lo, row_hi, key_lo, key_hi, dims, dim_mask, qk_scale_log2,
                          BLOCK_M, BLOCK_N, HEAD_DIM, IEEE_DOTS)
        store_rows(out_ptr + q_start.to(tl.int64) * stride_ot + head * stride_oh, rows,
                   stride_ot, dims, out, mask)
        tl.store(lse_ptr + head.to(tl.int64) * total_q + q_start + rows, lse, mask=rows < q_len)


@triton.jit
def _dkdv_query_block(dk, dv, k, v, cols, dims, dim_mask, start_m, head, q_base, stats_base,
                      q_len, k_len, q_ptr, grad_out_ptr, lse_ptr, delta_ptr, dq_acc_ptr,
                      stride_qt, stride_qh, stride_dot, stride_doh, stride_at, stride_ah,
                      qk_scale_log2, softmax_scale, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
                      BLOCK_M: tl.constexpr, IEEE_DOTS: tl.constexpr, ATOMIC_DQ: tl.constexpr,
                      KEYS_ON_M: tl.constexpr):
    """One query block's contribution to a key block's dK/dV (and, ATOMIC_DQ, its dS K to dQ)."""
    rows = start_m + tl.arange(0, BLOCK_M)
    q, grad_out, lse, delta = load_query_block(
        q_ptr + q_base * stride_qt + head * stride_qh,
        grad_out_ptr + q_base * stride_dot + head * stride_doh,
        lse_ptr + stats_base, delta_ptr + stats_base, rows, rows < q_len,
        stride_qt, stride_dot, dims, dim_mask)
    visible = None
    if MASKED:
        row_lo, row_hi = _row_key_bounds(rows, q_len, k_len, CAUSAL)
        if KEYS_ON_M:
            visible = keys_visible_to_rows(cols, row_lo, row_hi)
        else:
            visible = visible_keys(cols, row_lo, row_hi)
    if KEYS_ON_M:
        dk, dv, ds_t = dkdv_step_keys_on_m(dk, dv, k, v, q, grad_out, lse, delta, visible, 1.0,
                                           qk_scale_log2, False, MASKED, IEEE_DOTS)
        ds = tl.trans(ds_t)   # only atomic dQ reads it
    else:
        dk, dv, ds = dkdv_step(dk, dv, k, v, q, grad_out, lse, delta, visible, 1.0,
                               qk_scale_log2, False, MASKED, IEEE_DOTS)
    if ATOMIC_DQ:  # dQ += dS K, in fp32, from every key block (order not fixed)
        dq_part = dot(ds.to(k.dtype), k, IEEE_DOTS) * softmax_scale
        tl.atomic_add(dq_acc_ptr + q_base * stride_at + head * stride_ah
                      + rows[:, None].to(tl.int64) * stride_at + dims[None, :],
                      dq_part, mask=(rows < q_len)[:, None] & dim_mask[None, :], sem="relaxed")
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, grad_out_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                          dq_acc_ptr, cu_q_ptr, cu_k_ptr, stride_qt, stride_qh, stride_kt,
                          stride_kh, stride_vt, stride_vh, stride_dot, stride_doh, stride_at,
                          stride_ah, stride_dkt, stride_dkh, total_q, total_k, head_dim,
                          qk_scale_log2, softmax_scale, GROUP: tl.constexpr,
                          CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, IEEE_DOTS: tl.constexpr,
                          ATOMIC_DQ: tl.constexpr, KEYS_ON_M: tl.constexpr,
                          SPLIT_GROUP: tl.constexpr):
    """dK/dV of one key block of one sequence (dk/dv share the strides stride_dkt/dkh). A
    program owns a KV head and loops over the GROUP query heads that read it, or, SPLIT_GROUP,
    owns one query head and writes that head's share of dK/dV (fp32, (total_k, Hq, d)), which
    the launcher sums over each group in a fixed order."""
    block_n = tl.program_id(0)
    sequence = tl.program_id(1)
    if SPLIT_GROUP:
        first_head = tl.program_id(2)
        kv_head = first_head // GROUP
        out_head = first_head
    else:
        kv_head = tl.program_id(2)
        first_head = kv_head * GROUP
        out_head = kv_head
    heads: tl.constexpr = 1 if SPLIT_GROUP else GROUP
    # Only the split-group keys-on-M programs have the registers for a second, unmasked loop
    # (see the comment at `masked`).
    INTERIOR_UNMASKED: tl.constexpr = CAUSAL and SPLIT_GROUP and KEYS_ON_M and not ATOMIC_DQ
    k_start, k_len = _sequence_bounds(cu_k_ptr, sequence, total_k)
    if block_n * BLOCK_N < k_len:
        q_start, q_len = _sequence_bounds(cu_q_ptr, sequence, total_q)
        cols = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
        dims = tl.arange(0, HEAD_DIM)
        dim_mask = dims < head_dim
        kv_mask = (cols < k_len)[:, None] & dim_mask[None, :]
        k_base = k_start.to(tl.int64)
        k = load_rows(k_ptr + k_base * stride_kt + kv_head * stride_kh, cols, stride_kt, dims,
                      kv_mask)
        v = load_rows(v_ptr + k_base * stride_vt + kv_head * stride_vh, cols, stride_vt, dims,
                      kv_mask)
        dk = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
        dv = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
        # Causal: query rows i < n0 - (k_len - q_len) see none of these keys, so the loop starts
        # at the block holding the first row that does, and every block is masked. A second,
        # unmasked loop for the rows below the diagonal spilled 368 bytes at d = 128 on sm_90;
        # retried 2026-11-28 (triton 3.9, sm_90, causal GQA 7) on the split-group programs: d = 64
        # 212 -> 254 registers, d = 128 240 bytes of spills; clean only with keys on M (188 /
        # 219 registers), so only split-group keys-on-M programs run it (INTERIOR_UNMASKED; the
        # GPU check's "triton_kq_split_group" rows).
        # Non-causal: every row sees every key, no mask (rows past q_len have lse = +inf, so
        # P = 0; keys past k_len only touch dK/dV rows that are never stored) -- unless dS goes
        # into dQ (ATOMIC_DQ), where a key past k_len (K = 0, P possibly inf) would add NaN.
        masked: tl.constexpr = CAUSAL or ATOMIC_DQ
        m_first = 0
        if CAUSAL:
            m_first = tl.maximum(block_n * BLOCK_N - (k_len - q_len), 0) // BLOCK_M * BLOCK_M
        q_base = q_start.to(tl.int64)
        # Rows from m_split on see the whole key block (causal), so need no mask there.
        m_split = q_len
        if INTERIOR_UNMASKED:
            m_split = tl.minimum(tl.maximum(
                tl.cdiv(block_n * BLOCK_N + BLOCK_N - 1 - (k_len - q_len), BLOCK_M) * BLOCK_M,
                m_first), q_len)
        for head in range(first_head, first_head + heads):
            stats_base = tl.cast(head, tl.int64) * total_q + q_start
            # phase 0: the masked blocks from m_first; phase 1 (INTERIOR_UNMASKED): the rest
            for phase in tl.static_range(2 if INTERIOR_UNMASKED else 1):
                m_begin = m_first if phase == 0 else m_split
                m_end = m_split if phase == 0 else q_len
                for start_m in range(m_begin, m_end, BLOCK_M):
                    dk, dv = _dkdv_query_block(
                        dk, dv, k, v, cols, dims, dim_mask, start_m, head, q_base, stats_base,
                        q_len, k_len, q_ptr, grad_out_ptr, lse_ptr, delta_ptr, dq_acc_ptr,
                        stride_qt, stride_qh, stride_dot, stride_doh, stride_at, stride_ah,
                        qk_scale_log2, softmax_scale, CAUSAL, masked and phase == 0, BLOCK_M,
                        IEEE_DOTS, ATOMIC_DQ, KEYS_ON_M)
        store_rows(dk_ptr + k_base * stride_dkt + out_head * stride_dkh, cols, stride_dkt, dims,
                   dk * softmax_scale, kv_mask)
        store_rows(dv_ptr + k_base * stride_dkt + out_head * stride_dkh, cols, stride_dkt, dims,
                   dv, kv_mask)


@triton.jit
def _attn_bwd_dq_kernel(q_ptr, k_ptr, v_ptr, grad_out_ptr, lse_ptr, delta_ptr, dq_ptr, cu_q_ptr,
                        cu_k_ptr, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt,
                        stride_vh, stride_dot, stride_doh, total_q, total_k, head_dim,
                        qk_scale_log2, softmax_scale, GROUP: tl.constexpr, CAUSAL: tl.constexpr,
                        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        IEEE_DOTS: tl.constexpr):
    block_m = _query_block_index(CAUSAL)
    sequence = tl.program_id(1)
    head = tl.program_id(2)
    q_start, q_len = _sequence_bounds(cu_q_ptr, sequence, total_q)
    if block_m * BLOCK_M < q_len:
        k_start, k_len = _sequence_bounds(cu_k_ptr, sequence, total_k)
        kv_head = head // GROUP
        rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, HEAD_DIM)
        dim_mask = dims < head_dim
        q_base = q_start.to(tl.int64)
        stats_base = head.to(tl.int64) * total_q + q_start
        q, grad_out, lse, delta = load_query_block(
            q_ptr + q_base * stride_qt + head * stride_qh,
            grad_out_ptr + q_base * stride_dot + head * stride_doh, lse_ptr + stats_base,
            delta_ptr + stats_base, rows, rows < q_len, stride_qt, stride_dot, dims, dim_mask)
        row_lo, row_hi = _row_key_bounds(rows, q_len, k_len, CAUSAL)
        key_lo, key_hi = loop_bounds(row_lo, row_hi, k_len)
        k_base = k_start.to(tl.int64)
        dq = dq_block(q, grad_out, lse, delta, k_ptr + k_base * stride_kt + kv_head * stride_kh,
                      v_ptr + k_base * stride_vt + kv_head * stride_vh, stride_kt, stride_vt,
                      row_lo, row_hi, key_lo, key_hi, 1.0, dims, dim_mask, qk_scale_log2, False,
                      BLOCK_M, BLOCK_N, HEAD_DIM, IEEE_DOTS)
        store_rows(dq_ptr + q_base * stride_qt + head * stride_qh, rows, stride_qt, dims,
                   dq * softmax_scale, (rows < q_len)[:, None] & dim_mask[None, :])


# The backward candidates beside the default, each named as its benchmark rows ("triton_" +
# name), with the environment switches it sets. "kq_split_group" is the combination whose
# programs also skip the mask below the causal diagonal (INTERIOR_UNMASKED).
BACKWARD_VARIANTS = {"atomic_dq": ("NVLM_KERNELS_ATOMIC_DQ",),
                     "kq": ("NVLM_KERNELS_KEYS_ON_M",),
                     "split_group": ("NVLM_KERNELS_SPLIT_GROUP",),
                     "kq_split_group": ("NVLM_KERNELS_KEYS_ON_M", "NVLM_KERNELS_SPLIT_GROUP")}


def keys_on_m_enabled() -> bool:
    """NVLM_KERNELS_KEYS_ON_M=1: the dK/dV pass in the keys-on-M orientation (S^T = K Q^T;
    _attention_core.dkdv_step_keys_on_m) with its own tiles (CONFIGS' "bwd_dkdv_kq"), a
    candidate for Hopper until a GPU run times it against the default: the benchmark's
    "triton_kq" rows."""
    return os.environ.get("NVLM_KERNELS_KEYS_ON_M") == "1"


def split_group_enabled() -> bool:
    """NVLM_KERNELS_SPLIT_GROUP=1: under GQA, the dK/dV pass runs one program per query head
    (not per KV head over its whole group) and sums the group's fp32 shares afterwards, a
    candidate until a GPU run times it against the default: the benchmark's
    "triton_split_group" rows."""
    return os.environ.get("NVLM_KERNELS_SPLIT_GROUP") == "1"


def atomic_dq_enabled() -> bool:
    """NVLM_KERNELS_ATOMIC_DQ=1: the backward adds dQ with fp32 atomics from the dK/dV pass
    instead of a second pass (faster or not: the benchmark's "triton_atomic_dq" rows say), and
    results vary from run to run in the last bits. Never while torch demands determinism."""
    return (os.environ.get("NVLM_KERNELS_ATOMIC_DQ") == "1"
            and not torch.are_deterministic_algorithms_enabled())


@torch.library.custom_op("nvlm_triton::varlen_attention", mutates_args=())
def _varlen_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                         max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
                         causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = unit_last_stride(q), unit_last_stride(k), unit_last_stride(v)
    total_q, heads, head_dim = q.shape
    batch = cu_seqlens_q.numel() - 1
    out = new_output(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((heads, total_q), dtype=torch.float32, device=q.device)
    if total_q == 0 or batch <= 0 or max_seqlen_q == 0:
        return out.zero_(), lse.fill_(float("inf"))
    check_grid("varlen_attention", sequences=batch, heads=heads)
    padded = head_dim_padded(head_dim)

    def launch(config):
        block_m, block_n, warps, stages = config
        _attn_fwd_kernel[(triton.cdiv(max_seqlen_q, block_m), batch, heads)](
            q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, q.stride(0), q.stride(1), k.stride(0),
            k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1), total_q,
            k.shape[0], head_dim, softmax_scale * LOG2E, GROUP=heads // k.shape[1],
            CAUSAL=causal, HEAD_DIM=padded, BLOCK_M=block_m, BLOCK_N=block_n,
            IEEE_DOTS=q.dtype == torch.float32, num_warps=warps, num_stages=stages)

    launch_tuned("varlen_attention", causal, q.device, padded, "fwd", q.dtype, launch)
    return out, lse


@torch.library.custom_op("nvlm_triton::varlen_attention_backward", mutates_args=())
def _varlen_attention_backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                                  v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                                  cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                                  max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
                                  causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    grad_out = grad_out.contiguous()
    total_q, heads, head_dim = q.shape
    total_k, kv_heads, _ = k.shape
    batch = cu_seqlens_q.numel() - 1
    if total_q == 0 or total_k == 0 or batch <= 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    check_grid("varlen_attention", sequences=batch, heads=heads)
    out = unit_last_stride(out)
    padded = head_dim_padded(head_dim)
    delta = torch.empty((heads, total_q), dtype=torch.float32, device=q.device)
    delta_kernel[(triton.cdiv(total_q, DELTA_ROWS), heads)](
        out, grad_out, delta, out, delta, out.stride(0), out.stride(1), grad_out.stride(0),
        grad_out.stride(1), 0, 0, total_q, head_dim, HEAD_DIM=padded, BLOCK_M=DELTA_ROWS,
        GATE_GRAD=False, num_warps=4)
    flags = dict(GROUP=heads // kv_heads, CAUSAL=causal, HEAD_DIM=padded,
                 IEEE_DOTS=q.dtype == torch.float32)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
               grad_out.stride(0), grad_out.stride(1))
    scales = (softmax_scale * LOG2E, softmax_scale)
    atomic_dq = atomic_dq_enabled() and max_seqlen_k > 0
    keys_on_m = keys_on_m_enabled() and padded <= 128   # d = 256: see CONFIGS' comment
    dkdv_kind = "bwd_dkdv_kq" if keys_on_m else "bwd_dkdv"
    dq_acc = torch.empty((total_q, heads, head_dim) if atomic_dq else (0, 1, 1),
                         dtype=torch.float32, device=q.device)
    # No memset: the kernels write every row of every sequence, and valid cu_seqlens cover all
    # rows. As in the forward, rows outside every sequence (invalid contents, which the GPU
    # path does not check; NVLM_KERNELS_DEBUG=1 does) are left undefined.
    dq = new_output(q.shape, dtype=q.dtype, device=q.device)
    split_group = split_group_enabled() and heads > kv_heads
    if split_group:   # each query head's share of dK/dV, summed over its group below
        dk = new_output((total_k, heads, head_dim), dtype=torch.float32, device=q.device)
        dv = new_output((total_k, heads, head_dim), dtype=torch.float32, device=q.device)
    else:
        dk = new_output(k.shape, dtype=k.dtype, device=q.device)
        dv = new_output(v.shape, dtype=v.dtype, device=q.device)

    def launch_dkdv(config):
        block_m, block_n, warps, stages = config
        if atomic_dq:
            dq_acc.zero_()  # each launch adds every dS K into it (the tuner launches several)
        _attn_bwd_dkdv_kernel[(triton.cdiv(max_seqlen_k, block_n), batch,
                               heads if split_group else kv_heads)](
            q, k, v, grad_out, lse, delta, dk, dv, dq_acc, cu_seqlens_q, cu_seqlens_k, *strides,
            dq_acc.stride(0), dq_acc.stride(1), dk.stride(0), dk.stride(1), total_q, total_k,
            head_dim, *scales, **flags, BLOCK_M=block_m, BLOCK_N=block_n, ATOMIC_DQ=atomic_dq,
            KEYS_ON_M=keys_on_m, SPLIT_GROUP=split_group, num_warps=warps, num_stages=stages)

    def launch_dq(config):
        block_m, block_n, warps, stages = config
        _attn_bwd_dq_kernel[(triton.cdiv(max_seqlen_q, block_m), batch, heads)](
            q, k, v, grad_out, lse, delta, dq, cu_seqlens_q, cu_seqlens_k, *strides, total_q,
            total_k, head_dim, *scales, **flags, BLOCK_M=block_m, BLOCK_N=block_n,
            num_warps=warps, num_stages=stages)

    if max_seqlen_k:
        launch_tuned("varlen_attention", (causal, atomic_dq, split_group), q.device, padded,
                     dkdv_kind, q.dtype, launch_dkdv)
    if split_group:   # fixed order, fp32: deterministic
        group = heads // kv_heads
        dk = dk.view(total_k, kv_heads, group, head_dim).sum(2).to(k.dtype)
        dv = dv.view(total_k, kv_heads, group, head_dim).sum(2).to(v.dtype)
    if atomic_dq:
        dq.copy_(dq_acc)
    elif max_seqlen_q:
        launch_tuned("varlen_attention", causal, q.device, padded, "bwd_dq", q.dtype, launch_dq)
    return dq, dk, dv


register_varlen_attention(_varlen_attention_op, _varlen_attention_backward_op)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int,
                     max_seqlen_k: int, softmax_scale: float | None = None,
                     causal: bool = False) -> torch.Tensor:
    """The triton backend of nvlm_kernels.varlen_attention (inputs already validated)."""
    scale = softmax_scale_or_default(q, softmax_scale)
    out, _lse = _varlen_attention_op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                     max_seqlen_k, scale, causal)
    return out
