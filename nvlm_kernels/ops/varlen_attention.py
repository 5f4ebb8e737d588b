"""Triton variable-length flash attention over packed sequences, forward and backward.

Layout as flash-attention: q (total_q, Hq, d), k/v (total_k, Hkv, d), int32 cu_seqlens. Programs
run over (query block, sequence, head); each reads its sequence's bounds from cu_seqlens on the
device (clamped to the totals, so bad contents never address outside the tensors), and a block
past its sequence's end exits at once, so the only host-side size is the given max_seqlen.

Forward: online softmax in fp32 (exp2 with log2(e) folded into the scale); causal masks align
bottom-right (query i of lq sees key j <= i + lk - lq) and key blocks entirely above the diagonal
are never visited; GQA maps query head h to key head h // (Hq / Hkv) without copying K/V; the
log-sum-exp of each row is saved (+inf for a row that sees no key, whose output is 0).

Backward: D = rowsum(O * dO) first (a small kernel); then dK/dV in one pass over key blocks (each program owns a
key block of one key head and loops over the query heads of its GQA group and the query blocks
that see it) and dQ in a second pass over query blocks. Two passes recompute Q K^T twice, against
atomics on dQ (flash-attention 2's choice) that would make results run-to-run nondeterministic
and need an fp32 dQ buffer; we keep the deterministic form by default. (Measured comparison
pending a GPU run; see benchmarks/test_bench_varlen_attention.py.)

fp32 inputs use IEEE-precision dots (no tf32), so fp32 meets the 1e-4 reference tolerance;
fp16/bf16 dots accumulate in fp32. Head dims are padded to the next power of two (>= 16) and
masked, so every d <= 256 works; 64 and 128 need no padding.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._memory import new_output
from .._registration import register_varlen_attention
from ..compile_gate import KernelSpec

LOG2E = 1.4426950408889634


@triton.jit
def _sequence_bounds(cu_ptr, sequence, total):
    """(start, length) of `sequence`, clamped into [0, total] whatever cu_seqlens holds."""
    start = tl.minimum(tl.maximum(tl.load(cu_ptr + sequence), 0), total)
    end = tl.minimum(tl.maximum(tl.load(cu_ptr + sequence + 1), start), total)
    return start, end - start


@triton.jit
def _dot(a, b, IEEE_DOTS: tl.constexpr):
    """a @ b with fp32 accumulation; IEEE precision (no tf32) for the exact fp32 path."""
    if IEEE_DOTS:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _causal_key_end(block_m, q_len, k_len, BLOCK_M: tl.constexpr):
    """Keys past this end lie above the bottom-right diagonal for every row of the query block."""
    return tl.maximum(tl.minimum(k_len, (block_m + 1) * BLOCK_M + k_len - q_len), 0)


@triton.jit
def _attn_fwd_kernel(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, cu_q_ptr, cu_k_ptr,
                     stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_ot, stride_oh, total_q, total_k, head_dim, qk_scale_log2,
                     GROUP: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE_DOTS: tl.constexpr):
    block_m = tl.program_id(0)
    sequence = tl.program_id(1)
    head = tl.program_id(2)
    q_start, q_len = _sequence_bounds(cu_q_ptr, sequence, total_q)
    if block_m * BLOCK_M < q_len:
        k_start, k_len = _sequence_bounds(cu_k_ptr, sequence, total_k)
        kv_head = head // GROUP
        rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, HEAD_DIM)
        row_mask = rows < q_len
        dim_mask = dims < head_dim
        q = tl.load(q_ptr + (q_start + rows)[:, None].to(tl.int64) * stride_qt + head * stride_qh
                    + dims[None, :], mask=row_mask[:, None] & dim_mask[None, :], other=0.0)
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
        diagonal = k_len - q_len  # bottom-right alignment: row i sees cols <= i + diagonal
        k_end = k_len
        if CAUSAL:  # key blocks entirely above the diagonal are never loaded
            k_end = _causal_key_end(block_m, q_len, k_len, BLOCK_M)
        for start_n in range(0, k_end, BLOCK_N):
            cols = start_n + tl.arange(0, BLOCK_N)
            col_mask = cols < k_len
            kv_offsets = (k_start + cols)[:, None].to(tl.int64)
            kv_mask = col_mask[:, None] & dim_mask[None, :]
            k = tl.load(k_ptr + kv_offsets * stride_kt + kv_head * stride_kh + dims[None, :],
                        mask=kv_mask, other=0.0)
            scores = _dot(q, tl.trans(k), IEEE_DOTS) * qk_scale_log2
            visible = col_mask[None, :]
            if CAUSAL:
                visible = visible & (cols[None, :] <= rows[:, None] + diagonal)
            scores = tl.where(visible, scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing seen yet
            p = tl.exp2(scores - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_ptr + kv_offsets * stride_vt + kv_head * stride_vh + dims[None, :],
                        mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE_DOTS)
            m_i = m_new
        seen = l_i > 0.0
        out = acc / tl.where(seen, l_i, 1.0)[:, None]
        tl.store(out_ptr + (q_start + rows)[:, None].to(tl.int64) * stride_ot + head * stride_oh
                 + dims[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=row_mask[:, None] & dim_mask[None, :])
        lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("inf"))  # log2 units
        tl.store(lse_ptr + head.to(tl.int64) * total_q + q_start + rows, lse, mask=row_mask)


@triton.jit
def _attn_bwd_delta_kernel(out_ptr, grad_out_ptr, delta_ptr, stride_ot, stride_oh, stride_dot,
                           stride_doh, total_q, head_dim, HEAD_DIM: tl.constexpr,
                           BLOCK_M: tl.constexpr):
    """delta[h, i] = sum_d out[i, h, d] * grad_out[i, h, d] in fp32 (the softmax backward's
    row term), in the (Hq, total_q) layout of the saved log-sum-exp."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    head = tl.program_id(1)
    dims = tl.arange(0, HEAD_DIM)
    mask = (rows < total_q)[:, None] & (dims < head_dim)[None, :]
    offsets = rows[:, None].to(tl.int64)
    out = tl.load(out_ptr + offsets * stride_ot + head * stride_oh + dims[None, :], mask=mask,
                  other=0.0).to(tl.float32)
    grad_out = tl.load(grad_out_ptr + offsets * stride_dot + head * stride_doh + dims[None, :],
                       mask=mask, other=0.0).to(tl.float32)
    tl.store(delta_ptr + head.to(tl.int64) * total_q + rows, tl.sum(out * grad_out, axis=1),
             mask=rows < total_q)


@triton.jit
def _attn_bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, grad_out_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                          cu_q_ptr, cu_k_ptr, stride_qt, stride_qh, stride_kt, stride_kh,
                          stride_vt, stride_vh, stride_dot, stride_doh, total_q, total_k,
                          head_dim, qk_scale_log2, softmax_scale, GROUP: tl.constexpr,
                          CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, IEEE_DOTS: tl.constexpr):
    block_n = tl.program_id(0)
    sequence = tl.program_id(1)
    kv_head = tl.program_id(2)
    k_start, k_len = _sequence_bounds(cu_k_ptr, sequence, total_k)
    if block_n * BLOCK_N < k_len:
        q_start, q_len = _sequence_bounds(cu_q_ptr, sequence, total_q)
        cols = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
        dims = tl.arange(0, HEAD_DIM)
        col_mask = cols < k_len
        dim_mask = dims < head_dim
        kv_offsets = (k_start + cols)[:, None].to(tl.int64)
        kv_mask = col_mask[:, None] & dim_mask[None, :]
        k = tl.load(k_ptr + kv_offsets * stride_kt + kv_head * stride_kh + dims[None, :],
                    mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + kv_offsets * stride_vt + kv_head * stride_vh + dims[None, :],
                    mask=kv_mask, other=0.0)
        dk = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
        dv = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
        diagonal = k_len - q_len
        m_first = 0
        if CAUSAL:  # query rows i < n0 - diagonal see none of these keys
            m_first = tl.maximum(block_n * BLOCK_N - diagonal, 0) // BLOCK_M * BLOCK_M
        for head in range(kv_head * GROUP, kv_head * GROUP + GROUP):
            for start_m in range(m_first, q_len, BLOCK_M):
                rows = start_m + tl.arange(0, BLOCK_M)
                row_mask = rows < q_len
                q_offsets = (q_start + rows)[:, None].to(tl.int64)
                q_mask = row_mask[:, None] & dim_mask[None, :]
                q = tl.load(q_ptr + q_offsets * stride_qt + head * stride_qh + dims[None, :],
                            mask=q_mask, other=0.0)
                grad_out = tl.load(grad_out_ptr + q_offsets * stride_dot + head * stride_doh
                                   + dims[None, :], mask=q_mask, other=0.0)
                lse = tl.load(lse_ptr + tl.cast(head, tl.int64) * total_q + q_start + rows,
                              mask=row_mask, other=float("inf"))
                delta = tl.load(delta_ptr + tl.cast(head, tl.int64) * total_q + q_start + rows,
                                mask=row_mask, other=0.0)
                scores = _dot(q, tl.trans(k), IEEE_DOTS)
                visible = row_mask[:, None] & col_mask[None, :]
                if CAUSAL:
                    visible = visible & (cols[None, :] <= rows[:, None] + diagonal)
                p = tl.where(visible, tl.exp2(scores * qk_scale_log2 - lse[:, None]), 0.0)
                dv += _dot(tl.trans(p.to(grad_out.dtype)), grad_out, IEEE_DOTS)
                ds = p * (_dot(grad_out, tl.trans(v), IEEE_DOTS) - delta[:, None])
                dk += _dot(tl.trans(ds.to(q.dtype)), q, IEEE_DOTS)
        tl.store(dk_ptr + kv_offsets * stride_kt + kv_head * stride_kh + dims[None, :],
                 (dk * softmax_scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
        tl.store(dv_ptr + kv_offsets * stride_vt + kv_head * stride_vh + dims[None, :],
                 dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_kernel(q_ptr, k_ptr, v_ptr, grad_out_ptr, lse_ptr, delta_ptr, dq_ptr, cu_q_ptr,
                        cu_k_ptr, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt,
                        stride_vh, stride_dot, stride_doh, total_q, total_k, head_dim,
                        qk_scale_log2, softmax_scale, GROUP: tl.constexpr, CAUSAL: tl.constexpr,
                        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        IEEE_DOTS: tl.constexpr):
    block_m = tl.program_id(0)
    sequence = tl.program_id(1)
    head = tl.program_id(2)
    q_start, q_len = _sequence_bounds(cu_q_ptr, sequence, total_q)
    if block_m * BLOCK_M < q_len:
        k_start, k_len = _sequence_bounds(cu_k_ptr, sequence, total_k)
        kv_head = head // GROUP
        rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, HEAD_DIM)
        row_mask = rows < q_len
        dim_mask = dims < head_dim
        q_offsets = (q_start + rows)[:, None].to(tl.int64)
        q_mask = row_mask[:, None] & dim_mask[None, :]
        q = tl.load(q_ptr + q_offsets * stride_qt + head * stride_qh + dims[None, :], mask=q_mask,
                    other=0.0)
        grad_out = tl.load(grad_out_ptr + q_offsets * stride_dot + head * stride_doh
                           + dims[None, :], mask=q_mask, other=0.0)
        lse = tl.load(lse_ptr + head.to(tl.int64) * total_q + q_start + rows, mask=row_mask,
                      other=float("inf"))
        delta = tl.load(delta_ptr + head.to(tl.int64) * total_q + q_start + rows, mask=row_mask,
                        other=0.0)
        dq = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
        diagonal = k_len - q_len
        k_end = k_len
        if CAUSAL:
            k_end = _causal_key_end(block_m, q_len, k_len, BLOCK_M)
        for start_n in range(0, k_end, BLOCK_N):
            cols = start_n + tl.arange(0, BLOCK_N)
            col_mask = cols < k_len
            kv_offsets = (k_start + cols)[:, None].to(tl.int64)
            kv_mask = col_mask[:, None] & dim_mask[None, :]
            k = tl.load(k_ptr + kv_offsets * stride_kt + kv_head * stride_kh + dims[None, :],
                        mask=kv_mask, other=0.0)
            v = tl.load(v_ptr + kv_offsets * stride_vt + kv_head * stride_vh + dims[None, :],
                        mask=kv_mask, other=0.0)
            scores = _dot(q, tl.trans(k), IEEE_DOTS)
            dp = _dot(grad_out, tl.trans(v), IEEE_DOTS)
            visible = row_mask[:, None] & col_mask[None, :]
            if CAUSAL:
                visible = visible & (cols[None, :] <= rows[:, None] + diagonal)
            p = tl.where(visible, tl.exp2(scores * qk_scale_log2 - lse[:, None]), 0.0)
            ds = p * (dp - delta[:, None])
            dq += _dot(ds.to(k.dtype), k, IEEE_DOTS)
        tl.store(dq_ptr + q_offsets * stride_qt + head * stride_qh + dims[None, :],
                 (dq * softmax_scale).to(dq_ptr.dtype.element_ty), mask=q_mask)


# --------------------------------------------------------------------------------------------
# configurations: (BLOCK_M, BLOCK_N, num_warps, num_stages), chosen once per (arch, head dim,
# pass) and never re-tuned per total length.

_INTERPRETER_CONFIG = (32, 32, 4, 1)
_DELTA_ROWS = 32


def _config(device: torch.device, head_dim_padded: int, kind: str,
            dtype: torch.dtype) -> tuple[int, int, int, int]:
    if device.type != "cuda":
        return _INTERPRETER_CONFIG
    arch = "sm90" if torch.cuda.get_device_capability(device)[0] >= 9 else "sm80"
    width = "fp32" if dtype == torch.float32 else "16bit"
    return _CONFIGS[(arch, kind, min(head_dim_padded, 256), width)]


# Shared memory per forward program: Q (BM x D) + stages x (K + V) (BN x D), 2-byte elements.
# sm90 forward d=128: 32 KB + 3 x 32 KB = 128 KB of 227 KB. fp32 inputs (IEEE dots) get smaller
# tiles: their elements are twice as wide. The compile gate builds every entry.
_CONFIGS = {
    **{("sm90", "fwd", d, "16bit"): (128, 64, 8, 3) for d in (16, 32, 64, 128)},
    ("sm90", "fwd", 256, "16bit"): (64, 32, 8, 2),
    **{("sm80", "fwd", d, "16bit"): (128, 64, 4, 2) for d in (16, 32, 64)},
    ("sm80", "fwd", 128, "16bit"): (128, 32, 8, 2),
    ("sm80", "fwd", 256, "16bit"): (64, 32, 8, 1),
    **{(arch, "bwd", d, "16bit"): (64, 64, 4, 2) for arch in ("sm90", "sm80") for d in (16, 32, 64)},
    **{(arch, "bwd", 128, "16bit"): (64, 64, 8, 2) for arch in ("sm90", "sm80")},
    ("sm90", "bwd", 256, "16bit"): (64, 64, 8, 1),  # 64-row blocks: wgmma needs M >= 64
    ("sm80", "bwd", 256, "16bit"): (32, 32, 8, 1),
    **{(arch, "fwd", d, "fp32"): (64, 32, 4, 2) for arch in ("sm90", "sm80")
       for d in (16, 32, 64, 128)},
    **{(arch, "fwd", 256, "fp32"): (32, 32, 4, 1) for arch in ("sm90", "sm80")},
    **{(arch, "bwd", d, "fp32"): (32, 32, 4, 1) for arch in ("sm90", "sm80")
       for d in (16, 32, 64, 128)},
    **{(arch, "bwd", 256, "fp32"): (16, 16, 4, 1) for arch in ("sm90", "sm80")},
}


def _head_dim_padded(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_grid(batch: int, heads: int) -> None:
    if batch > 65535 or heads > 65535:
        raise ValueError(f"the triton varlen_attention launches (blocks, {batch} sequences, "
                         f"{heads} heads); grid axes 1 and 2 allow at most 65535")


@torch.library.custom_op("nvlm_triton::varlen_attention", mutates_args=())
def _varlen_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                         max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
                         causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
    total_q, heads, head_dim = q.shape
    batch = cu_seqlens_q.numel() - 1
    out = new_output(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((heads, total_q), dtype=torch.float32, device=q.device)
    if total_q == 0 or batch <= 0 or max_seqlen_q == 0:
        return out.zero_(), lse.fill_(float("inf"))
    _check_grid(batch, heads)
    padded = _head_dim_padded(head_dim)
    block_m, block_n, warps, stages = _config(q.device, padded, "fwd", q.dtype)
    grid = (triton.cdiv(max_seqlen_q, block_m), batch, heads)
    _attn_fwd_kernel[grid](
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, q.stride(0), q.stride(1), k.stride(0),
        k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1), total_q, k.shape[0],
        head_dim, softmax_scale * LOG2E, GROUP=heads // k.shape[1], CAUSAL=causal,
        HEAD_DIM=padded, BLOCK_M=block_m, BLOCK_N=block_n, IEEE_DOTS=q.dtype == torch.float32,
        num_warps=warps, num_stages=stages)
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
    dq = torch.zeros_like(q)
    dk = torch.zeros_like(k)
    dv = torch.zeros_like(v)
    if total_q == 0 or total_k == 0 or batch <= 0:
        return dq, dk, dv
    _check_grid(batch, heads)
    out = _unit_last_stride(out)
    padded = _head_dim_padded(head_dim)
    delta = torch.empty((heads, total_q), dtype=torch.float32, device=q.device)
    _attn_bwd_delta_kernel[(triton.cdiv(total_q, _DELTA_ROWS), heads)](
        out, grad_out, delta, out.stride(0), out.stride(1), grad_out.stride(0),
        grad_out.stride(1), total_q, head_dim, HEAD_DIM=padded, BLOCK_M=_DELTA_ROWS, num_warps=4)
    block_m, block_n, warps, stages = _config(q.device, padded, "bwd", q.dtype)
    common = dict(GROUP=heads // kv_heads, CAUSAL=causal, HEAD_DIM=padded, BLOCK_M=block_m,
                  BLOCK_N=block_n, IEEE_DOTS=q.dtype == torch.float32, num_warps=warps,
                  num_stages=stages)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
               grad_out.stride(0), grad_out.stride(1))
    scales = (softmax_scale * LOG2E, softmax_scale)
    if max_seqlen_k:
        _attn_bwd_dkdv_kernel[(triton.cdiv(max_seqlen_k, block_n), batch, kv_heads)](
            q, k, v, grad_out, lse, delta, dk, dv, cu_seqlens_q, cu_seqlens_k, *strides, total_q,
            total_k, head_dim, *scales, **common)
    if max_seqlen_q:
        _attn_bwd_dq_kernel[(triton.cdiv(max_seqlen_q, block_m), batch, heads)](
            q, k, v, grad_out, lse, delta, dq, cu_seqlens_q, cu_seqlens_k, *strides, total_q,
            total_k, head_dim, *scales, **common)
    return dq, dk, dv


register_varlen_attention(_varlen_attention_op, _varlen_attention_backward_op)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int,
                     max_seqlen_k: int, softmax_scale: float | None = None,
                     causal: bool = False) -> torch.Tensor:
    """The triton backend of nvlm_kernels.varlen_attention (inputs already validated)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    out, _lse = _varlen_attention_op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                     max_seqlen_k, scale, causal)
    return out


# --------------------------------------------------------------------------------------------
# compile gate: every shipped config x head dim x causal x dtype, for the arch it is meant for


# Spills the compile gate measured (cuobjdump STACK bytes, triton 3.9, 2026-11-27) and accepts:
# - 16-bit configs at the register limit (255): small spills in the backward, largest at
#   d = 256 on sm_90. They cost speed, not correctness; retune these entries on a GPU.
# - fp32 (IEEE dots, the exact path for fp32 inputs): the dots lower to FMA loops that spill up
#   to ~10 KB per thread. fp32 attention is for correctness checks, not speed.
_MEASURED_SPILLS_16BIT = {("sm80", "bwd_dkdv", 64): 16, ("sm80", "bwd_dkdv", 128): 64,
                          ("sm80", "bwd_dq", 256): 16, ("sm90", "bwd_dkdv", 256): 568,
                          ("sm90", "bwd_dq", 256): 184}
_MEASURED_SPILLS_FP32 = 10 * 1024 + 512


def _allowed_spills(arch: str, kernel: str, padded: int, dtype: str) -> int:
    if dtype == "fp32":
        return _MEASURED_SPILLS_FP32
    return _MEASURED_SPILLS_16BIT.get((arch, kernel, padded), 0)


def _specs() -> list[KernelSpec]:
    specs = [KernelSpec(
        f"varlen_attention_bwd_delta[d={padded}]", _attn_bwd_delta_kernel,
        {"out_ptr": "*bf16", "grad_out_ptr": "*bf16", "delta_ptr": "*fp32", "stride_ot": "i32",
         "stride_oh": "i32", "stride_dot": "i32", "stride_doh": "i32", "total_q": "i32",
         "head_dim": "i32", "HEAD_DIM": "constexpr", "BLOCK_M": "constexpr"},
        {"HEAD_DIM": padded, "BLOCK_M": _DELTA_ROWS},
        divisible_by_16=("out_ptr", "grad_out_ptr", "stride_ot", "stride_oh", "stride_dot",
                         "stride_doh", "head_dim"), expects_16_byte_access=True)
        for padded in (64, 128, 256)]
    for (arch, kind, padded, width), (block_m, block_n, warps, stages) in _CONFIGS.items():
        if width == "fp32" and padded < 64:
            continue  # the d = 16/32 fp32 entries repeat the d = 64 one
        for causal in (False, True):
            for dtype in (("bf16",) if width == "16bit" else ("fp32",)):  # fp16 lowers like bf16
                pointer = f"*{dtype}"
                name = (f"varlen_attention_{kind}[{arch},d={padded},"
                        f"{'causal' if causal else 'full'},{dtype}]")
                constexprs = {"GROUP": 1, "CAUSAL": causal, "HEAD_DIM": padded, "BLOCK_M": block_m,
                              "BLOCK_N": block_n, "IEEE_DOTS": dtype == "fp32"}
                arch_number = 90 if arch == "sm90" else 80
                if kind == "fwd":
                    signature = {"q_ptr": pointer, "k_ptr": pointer, "v_ptr": pointer,
                                 "out_ptr": pointer, "lse_ptr": "*fp32", "cu_q_ptr": "*i32",
                                 "cu_k_ptr": "*i32", **{s: "i32" for s in (
                                     "stride_qt", "stride_qh", "stride_kt", "stride_kh",
                                     "stride_vt", "stride_vh", "stride_ot", "stride_oh",
                                     "total_q", "total_k", "head_dim")},
                                 "qk_scale_log2": "fp32",
                                 **{c: "constexpr" for c in constexprs}}
                    specs.append(KernelSpec(
                        name, _attn_fwd_kernel, signature, constexprs, num_warps=warps,
                        num_stages=stages, archs=(arch_number,), expects_wgmma=dtype != "fp32",
                        allowed_spill_bytes=_allowed_spills(arch, "fwd", padded, dtype),
                        divisible_by_16=("q_ptr", "k_ptr", "v_ptr", "out_ptr", "stride_qt",
                                         "stride_qh", "stride_kt", "stride_kh", "stride_vt",
                                         "stride_vh", "stride_ot", "stride_oh", "head_dim")))
                    continue
                base = {"q_ptr": pointer, "k_ptr": pointer, "v_ptr": pointer,
                        "grad_out_ptr": pointer, "lse_ptr": "*fp32", "delta_ptr": "*fp32"}
                tail = {"cu_q_ptr": "*i32", "cu_k_ptr": "*i32", **{s: "i32" for s in (
                    "stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh",
                    "stride_dot", "stride_doh", "total_q", "total_k", "head_dim")},
                    "qk_scale_log2": "fp32", "softmax_scale": "fp32",
                    **{c: "constexpr" for c in constexprs}}
                aligned = ("q_ptr", "k_ptr", "v_ptr", "grad_out_ptr", "stride_qt", "stride_qh",
                           "stride_kt", "stride_kh", "stride_vt", "stride_vh", "stride_dot",
                           "stride_doh", "head_dim")
                specs.append(KernelSpec(
                    name.replace("_bwd[", "_bwd_dkdv["), _attn_bwd_dkdv_kernel,
                    {**base, "dk_ptr": pointer, "dv_ptr": pointer, **tail}, constexprs,
                    num_warps=warps, num_stages=stages, archs=(arch_number,), expects_wgmma=dtype != "fp32",
                    allowed_spill_bytes=_allowed_spills(arch, "bwd_dkdv", padded, dtype),
                    divisible_by_16=aligned + ("dk_ptr", "dv_ptr")))
                specs.append(KernelSpec(
                    name.replace("_bwd[", "_bwd_dq["), _attn_bwd_dq_kernel,
                    {**base, "dq_ptr": pointer, **tail}, constexprs, num_warps=warps,
                    num_stages=stages, archs=(arch_number,), expects_wgmma=dtype != "fp32",
                    allowed_spill_bytes=_allowed_spills(arch, "bwd_dq", padded, dtype),
                    divisible_by_16=aligned + ("dq_ptr",)))
    return specs


COMPILE_SPECS = _specs()
