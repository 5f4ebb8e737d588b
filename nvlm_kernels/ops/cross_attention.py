"""Triton gated cross-attention with per-query key ranges (NVLM-X/H), forward and backward.

q (total_q, Hq, d) text queries; k/v (total_kv, Hkv, d) the packed memory; int32 kv_start/kv_end:
query row i sees memory rows [kv_start[i], kv_end[i]). The loops are the attention core shared
with varlen attention (_attention_core.py); this module finds the bounds and launches programs.

Forward: programs over (query block, query head). A block's rows usually share one range (the
text of one sample after one image), so the program loops over the union of its rows' ranges and
masks per row; an empty range gives a 0 row (lse = +inf, so no gradient either). Ranges are
clamped into [0, total_kv] in the kernel, so bad contents never address outside the memory (the
public op validates them on the CPU and with NVLM_KERNELS_DEBUG=1).

Gate: the caller passes the per-head factor tanh(gate) as an (Hq,) fp32 vector (a 64-element
torch op, differentiable as usual); the kernel multiplies it into the output in the epilogue, so
the gated output costs no extra pass. Its gradient needs the ungated output O (the gate is 0 at
initialisation, so O cannot be recovered from the gated one): when the factor requires a
gradient the forward also writes O, which the backward's delta kernel reduces with dO into
d factor[h] = sum_i O[i, h] . dO[i, h] (per-block partial sums, added up in a fixed order).
The softmax backward itself runs on dO_inner = factor * dO, folded in as fp32 factors, and
delta = rowsum(O_gated * dO) = rowsum(O * dO_inner), so it needs only the gated output.

Backward: delta first, then dK/dV over key blocks (each program owns a key block of one key head
and loops over the query blocks whose ranges reach it, then the query heads of its GQA group) and
dQ over query blocks: deterministic, no atomics, as for varlen attention. Which query blocks reach
a key block is computed on the device by the launcher from the ranges ((query blocks x key
blocks) comparisons in one small kernel, no host sync) as a span [first, last) of query blocks.
In NVLM's layouts the span is tight (the text that sees an image is contiguous); with arbitrary
ranges a block inside the span that misses the key block costs fully masked work, never a wrong
result. A per-block skip test was tried and dropped: it cost registers (the d = 128 sm_90 dK/dV
program spilled 88 bytes with it, none without).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._memory import new_output
from ..reference import softmax_scale_or_default
from .._registration import register_cross_attention
from ._attention_core import (DELTA_ROWS, LOG2E, attend, check_grid, delta_kernel, dkdv_step,
                              dq_block, head_dim_padded, launch_tuned, load_query_block,
                              load_rows, loop_bounds, store_rows, unit_last_stride,
                              visible_keys)


@triton.jit
def _row_key_ranges(start_ptr, end_ptr, rows, row_mask, total_kv):
    """Each row's [lo, hi), clamped into [0, total_kv] with hi >= lo; masked rows are empty."""
    lo = tl.load(start_ptr + rows, mask=row_mask, other=0)
    hi = tl.load(end_ptr + rows, mask=row_mask, other=0)
    lo = tl.minimum(tl.maximum(lo, 0), total_kv)
    hi = tl.minimum(tl.maximum(hi, lo), total_kv)
    return lo, hi


@triton.jit
def _query_block(start_ptr, end_ptr, total_q, total_kv, head_dim, BLOCK_M: tl.constexpr,
                 HEAD_DIM: tl.constexpr):
    """The query block of program_id(0): its rows and dims with their masks, each row's key
    range and the block's key loop bounds."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < total_q
    dims = tl.arange(0, HEAD_DIM)
    row_lo, row_hi = _row_key_ranges(start_ptr, end_ptr, rows, row_mask, total_kv)
    key_lo, key_hi = loop_bounds(row_lo, row_hi, total_kv)
    return rows, row_mask, dims, dims < head_dim, row_lo, row_hi, key_lo, key_hi


@triton.jit
def _query_block_spans_kernel(start_ptr, end_ptr, first_ptr, last_ptr, total_q, total_kv,
                              query_blocks, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              QUERY_BLOCKS: tl.constexpr):
    """[first, last) of the query blocks whose rows' (clamped) ranges reach key block
    program_id(0), reading QUERY_BLOCKS x BLOCK_M ranges per step. Replaces a dozen small torch
    launches per backward (one launch, no (query blocks x key blocks) temporaries)."""
    key_block = tl.program_id(0)
    key_lo = key_block * BLOCK_N
    first = query_blocks
    last = 0
    for block0 in range(0, query_blocks, QUERY_BLOCKS):
        blocks = block0 + tl.arange(0, QUERY_BLOCKS)
        rows = blocks[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
        row_lo, row_hi = _row_key_ranges(start_ptr, end_ptr, rows, rows < total_q, total_kv)
        nonempty = row_lo < row_hi
        block_lo = tl.min(tl.where(nonempty, row_lo, total_kv), axis=1)
        block_hi = tl.max(tl.where(nonempty, row_hi, 0), axis=1)
        reaches = (block_lo < key_lo + BLOCK_N) & (block_hi > key_lo) & (blocks < query_blocks)
        first = tl.minimum(first, tl.min(tl.where(reaches, blocks, query_blocks), axis=0))
        last = tl.maximum(last, tl.max(tl.where(reaches, blocks + 1, 0), axis=0))
    tl.store(first_ptr + key_block, first)
    tl.store(last_ptr + key_block, last)


@triton.jit
def _cross_fwd_kernel(q_ptr, k_ptr, v_ptr, start_ptr, end_ptr, gate_ptr, out_ptr, ungated_ptr,
                      lse_ptr, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                      stride_ot, stride_oh, stride_ut, stride_uh, total_q, total_kv, head_dim,
                      qk_scale_log2, GROUP: tl.constexpr, GATED: tl.constexpr,
                      SAVE_UNGATED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, IEEE_DOTS: tl.constexpr):
    head = tl.program_id(1)
    kv_head = head // GROUP
    rows, row_mask, dims, dim_mask, row_lo, row_hi, key_lo, key_hi = _query_block(
        start_ptr, end_ptr, total_q, total_kv, head_dim, BLOCK_M, HEAD_DIM)
    mask = row_mask[:, None] & dim_mask[None, :]
    q = load_rows(q_ptr + head * stride_qh, rows, stride_qt, dims, mask)
    out, lse = attend(q, k_ptr + kv_head * stride_kh, v_ptr + kv_head * stride_vh, stride_kt,
                      stride_vt, row_lo, row_hi, key_lo, key_hi, dims, dim_mask, qk_scale_log2,
                      BLOCK_M, BLOCK_N, HEAD_DIM, IEEE_DOTS)
    if GATED:
        if SAVE_UNGATED:
            store_rows(ungated_ptr + head * stride_uh, rows, stride_ut, dims, out, mask)
        out = out * tl.load(gate_ptr + head)
    store_rows(out_ptr + head * stride_oh, rows, stride_ot, dims, out, mask)
    tl.store(lse_ptr + head.to(tl.int64) * total_q + rows, lse, mask=row_mask)


@triton.jit
def _cross_bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, grad_out_ptr, lse_ptr, delta_ptr, start_ptr,
                           end_ptr, gate_ptr, first_ptr, last_ptr, dk_ptr, dv_ptr, stride_qt,
                           stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot,
                           stride_doh, total_q, total_kv, head_dim, qk_scale_log2, softmax_scale,
                           GROUP: tl.constexpr, GATED: tl.constexpr, HEAD_DIM: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           IEEE_DOTS: tl.constexpr):
    block_n = tl.program_id(0)
    kv_head = tl.program_id(1)
    cols = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    dim_mask = dims < head_dim
    kv_mask = (cols < total_kv)[:, None] & dim_mask[None, :]
    k = load_rows(k_ptr + kv_head * stride_kh, cols, stride_kt, dims, kv_mask)
    v = load_rows(v_ptr + kv_head * stride_vh, cols, stride_vt, dims, kv_mask)
    dk = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    first = tl.load(first_ptr + block_n)
    last = tl.load(last_ptr + block_n)
    for head in range(kv_head * GROUP, kv_head * GROUP + GROUP):
        gate = 1.0
        if GATED:
            gate = tl.load(gate_ptr + head)
        stats = tl.cast(head, tl.int64) * total_q
        for block_m in range(first, last):
            rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
            row_mask = rows < total_q
            row_lo, row_hi = _row_key_ranges(start_ptr, end_ptr, rows, row_mask, total_kv)
            q, grad_out, lse, delta = load_query_block(
                q_ptr + head * stride_qh, grad_out_ptr + head * stride_doh, lse_ptr + stats,
                delta_ptr + stats, rows, row_mask, stride_qt, stride_dot, dims, dim_mask)
            visible = visible_keys(cols, row_lo, row_hi)
            dk, dv, _ds = dkdv_step(dk, dv, k, v, q, grad_out, lse, delta, visible, gate,
                               qk_scale_log2, GATED, True, IEEE_DOTS)
    store_rows(dk_ptr + kv_head * stride_kh, cols, stride_kt, dims, dk * softmax_scale, kv_mask)
    store_rows(dv_ptr + kv_head * stride_vh, cols, stride_vt, dims, dv, kv_mask)


@triton.jit
def _cross_bwd_dq_kernel(q_ptr, k_ptr, v_ptr, grad_out_ptr, lse_ptr, delta_ptr, start_ptr,
                         end_ptr, gate_ptr, dq_ptr, stride_qt, stride_qh, stride_kt, stride_kh,
                         stride_vt, stride_vh, stride_dot, stride_doh, total_q, total_kv,
                         head_dim, qk_scale_log2, softmax_scale, GROUP: tl.constexpr,
                         GATED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, IEEE_DOTS: tl.constexpr):
    head = tl.program_id(1)
    kv_head = head // GROUP
    rows, row_mask, dims, dim_mask, row_lo, row_hi, key_lo, key_hi = _query_block(
        start_ptr, end_ptr, total_q, total_kv, head_dim, BLOCK_M, HEAD_DIM)
    stats = head.to(tl.int64) * total_q
    q, grad_out, lse, delta = load_query_block(
        q_ptr + head * stride_qh, grad_out_ptr + head * stride_doh, lse_ptr + stats,
        delta_ptr + stats, rows, row_mask, stride_qt, stride_dot, dims, dim_mask)
    gate = 1.0
    if GATED:
        gate = tl.load(gate_ptr + head)
    dq = dq_block(q, grad_out, lse, delta, k_ptr + kv_head * stride_kh,
                  v_ptr + kv_head * stride_vh, stride_kt, stride_vt, row_lo, row_hi, key_lo,
                  key_hi, gate, dims, dim_mask, qk_scale_log2, GATED, BLOCK_M, BLOCK_N, HEAD_DIM,
                  IEEE_DOTS)
    store_rows(dq_ptr + head * stride_qh, rows, stride_qt, dims, dq * softmax_scale,
               row_mask[:, None] & dim_mask[None, :])


# --------------------------------------------------------------------------------------------
# launchers


def _query_block_spans(kv_start: torch.Tensor, kv_end: torch.Tensor, total_kv: int,
                       block_m: int, block_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each key block, the span [first, last) of query blocks whose rows' ranges reach it
    (first >= last: none), on the device in one launch (no host sync)."""
    total_q = kv_start.numel()
    key_blocks = triton.cdiv(total_kv, block_n)
    first = torch.empty(key_blocks, dtype=torch.int32, device=kv_start.device)
    last = torch.empty(key_blocks, dtype=torch.int32, device=kv_start.device)
    _query_block_spans_kernel[(key_blocks,)](
        kv_start, kv_end, first, last, total_q, total_kv, triton.cdiv(total_q, block_m),
        BLOCK_M=block_m, BLOCK_N=block_n, QUERY_BLOCKS=_SPAN_QUERY_BLOCKS, num_warps=4)
    return first, last


# Query blocks one step of _query_block_spans_kernel reads at once (16 x BLOCK_M ranges).
_SPAN_QUERY_BLOCKS = 16


@torch.library.custom_op("nvlm_triton::cross_attention", mutates_args=())
def _cross_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        kv_start: torch.Tensor, kv_end: torch.Tensor,
                        gate_factor: torch.Tensor | None, softmax_scale: float,
                        save_ungated: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, lse, ungated): ungated is the output before the gate when save_ungated (for the
    gate's gradient), else empty."""
    q, k, v = unit_last_stride(q), unit_last_stride(k), unit_last_stride(v)
    total_q, heads, head_dim = q.shape
    gated = gate_factor is not None
    save_ungated = save_ungated and gated
    out = new_output(q.shape, dtype=q.dtype, device=q.device)
    ungated = new_output(q.shape if save_ungated else (0,), dtype=q.dtype, device=q.device)
    lse = torch.empty((heads, total_q), dtype=torch.float32, device=q.device)
    if total_q == 0:
        return out, lse, ungated
    check_grid("cross_attention", heads=heads)
    padded = head_dim_padded(head_dim)
    target = ungated if save_ungated else out

    def launch(config):
        block_m, block_n, warps, stages = config
        _cross_fwd_kernel[(triton.cdiv(total_q, block_m), heads)](
            q, k, v, kv_start, kv_end, gate_factor if gated else q, out, target, lse,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            out.stride(0), out.stride(1), target.stride(0), target.stride(1), total_q,
            k.shape[0], head_dim, softmax_scale * LOG2E, GROUP=heads // k.shape[1], GATED=gated,
            SAVE_UNGATED=save_ungated, HEAD_DIM=padded, BLOCK_M=block_m, BLOCK_N=block_n,
            IEEE_DOTS=q.dtype == torch.float32, num_warps=warps, num_stages=stages)

    launch_tuned("cross_attention", gated, q.device, padded, "fwd", q.dtype, launch)
    return out, lse, ungated


@torch.library.custom_op("nvlm_triton::cross_attention_backward", mutates_args=())
def _cross_attention_backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                                 v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                                 ungated: torch.Tensor, kv_start: torch.Tensor,
                                 kv_end: torch.Tensor, gate_factor: torch.Tensor | None,
                                 softmax_scale: float, gate_grad: bool
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, d gate_factor); the last is (Hq,) fp32 when gate_grad, else empty."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    grad_out = grad_out.contiguous()
    total_q, heads, head_dim = q.shape
    total_kv, kv_heads, _ = k.shape
    gated = gate_factor is not None
    gate_grad = gate_grad and gated
    d_gate = torch.zeros((heads,) if gate_grad else (0,), dtype=torch.float32, device=q.device)
    if total_q == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), d_gate
    # No memset: the dK/dV programs cover every key row and the dQ programs every query row.
    dq, dk, dv = (new_output(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    check_grid("cross_attention", heads=heads)
    out = unit_last_stride(out)
    ungated = unit_last_stride(ungated) if gate_grad else out
    padded = head_dim_padded(head_dim)
    delta = torch.empty((heads, total_q), dtype=torch.float32, device=q.device)
    delta_blocks = triton.cdiv(total_q, DELTA_ROWS)
    partial = torch.empty((delta_blocks, heads) if gate_grad else (0,), dtype=torch.float32,
                          device=q.device)
    delta_kernel[(delta_blocks, heads)](
        out, grad_out, delta, ungated, partial if gate_grad else delta, out.stride(0),
        out.stride(1), grad_out.stride(0), grad_out.stride(1), ungated.stride(0),
        ungated.stride(1), total_q, head_dim, HEAD_DIM=padded, BLOCK_M=DELTA_ROWS,
        GATE_GRAD=gate_grad, num_warps=4)
    if gate_grad:
        d_gate = partial.sum(0)
    if total_kv == 0:   # no key: dQ is zero (dK and dV have no rows)
        return dq.zero_(), dk, dv, d_gate
    flags = dict(GROUP=heads // kv_heads, GATED=gated, HEAD_DIM=padded,
                 IEEE_DOTS=q.dtype == torch.float32)
    gate = gate_factor if gated else q
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
               grad_out.stride(0), grad_out.stride(1))
    scalars = (total_q, total_kv, head_dim, softmax_scale * LOG2E, softmax_scale)

    def launch_dkdv(config):
        block_m, block_n, warps, stages = config
        first, last = _query_block_spans(kv_start, kv_end, total_kv, block_m, block_n)
        _cross_bwd_dkdv_kernel[(triton.cdiv(total_kv, block_n), kv_heads)](
            q, k, v, grad_out, lse, delta, kv_start, kv_end, gate, first, last, dk, dv,
            *strides, *scalars, **flags, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
            num_stages=stages)

    def launch_dq(config):
        block_m, block_n, warps, stages = config
        _cross_bwd_dq_kernel[(triton.cdiv(total_q, block_m), heads)](
            q, k, v, grad_out, lse, delta, kv_start, kv_end, gate, dq, *strides, *scalars,
            **flags, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages)

    launch_tuned("cross_attention", gated, q.device, padded, "bwd_dkdv", q.dtype, launch_dkdv)
    launch_tuned("cross_attention", gated, q.device, padded, "bwd_dq", q.dtype, launch_dq)
    return dq, dk, dv, d_gate


register_cross_attention(_cross_attention_op, _cross_attention_backward_op)


def gate_factor(gate: torch.Tensor | float | None, heads: int,
                device: torch.device) -> torch.Tensor | None:
    """tanh(gate) as the (heads,) fp32 vector the kernels read; differentiable in a tensor gate."""
    if gate is None:
        return None
    if isinstance(gate, torch.Tensor):
        return torch.tanh(gate.float()).reshape(-1).expand(heads).contiguous()
    return torch.full((heads,), math.tanh(gate), dtype=torch.float32, device=device)


def cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_start: torch.Tensor,
                    kv_end: torch.Tensor, softmax_scale: float | None = None,
                    gate: torch.Tensor | float | None = None) -> torch.Tensor:
    """The triton backend of nvlm_kernels.cross_attention (inputs already validated)."""
    scale = softmax_scale_or_default(q, softmax_scale)
    factor = gate_factor(gate, q.shape[1], q.device)
    save_ungated = factor is not None and factor.requires_grad
    out, _lse, _ungated = _cross_attention_op(q, k, v, kv_start, kv_end, factor, scale,
                                              save_ungated)
    return out
