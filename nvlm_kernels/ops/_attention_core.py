"""The attention core shared by the varlen and the cross-attention kernels.

Both ops are "a block of query rows, each seeing one contiguous range of key rows": varlen
attention's row i of a sequence sees keys [0, k_len) (causal: [0, i + k_len - q_len]), and
cross-attention's row i sees [kv_start[i], kv_end[i]). So one set of @triton.jit helpers holds
the online softmax, the softmax backward and the dK/dV and dQ accumulations, parameterized by
per-row key bounds (`row_lo`, `row_hi`) and the block's key loop bounds (`key_lo`, `key_hi`,
the union of its rows' ranges); the two ops only differ in how they find those bounds and which
programs they launch (ops/varlen_attention.py, ops/cross_attention.py).

Conventions: key pointers arrive offset to key row 0 of the bounds' coordinate system and to the
key head; scores are in log2 units (log2(e) folded into the scale, exp2 in the loop); the saved
log-sum-exp is +inf for a row that sees no key, whose output is 0 and whose gradients are 0.
`gate` (cross-attention) multiplies the attention output per query head; the backward takes
dO_inner = gate * dO, folded in as an fp32 factor on dO V^T and on P (never a rounded copy of dO).

Masks only where needed: the forward and dQ loops first run the whole key blocks that every
non-empty row of the query block sees entirely, with no per-row bounds and no key bound (the
interior of a causal row block, all but the last block of a full sequence, the shared memory
range of a cross-attention block), then the edge blocks with masks. Empty rows (a cross-attention
row before any image, rows past a sequence's end) take garbage in the unmasked blocks and are
zeroed at the end by their empty range, not by their running sum. The varlen dK/dV loop masks
only when causal; cross-attention's dK/dV always masks (its rows' ranges vary per key block).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch
import triton
import triton.language as tl

from .._tuning import pick

LOG2E = 1.4426950408889634


@triton.jit
def dot(a, b, IEEE_DOTS: tl.constexpr):
    """a @ b with fp32 accumulation; IEEE precision (no tf32) for the exact fp32 path."""
    if IEEE_DOTS:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def load_rows(ptr, rows, stride_t, dims, mask):
    """Rows `rows` (token indices) of a (tokens, d) view: ptr is at row 0 of the right head."""
    return tl.load(ptr + rows[:, None].to(tl.int64) * stride_t + dims[None, :], mask=mask,
                   other=0.0)


@triton.jit
def store_rows(ptr, rows, stride_t, dims, value, mask):
    tl.store(ptr + rows[:, None].to(tl.int64) * stride_t + dims[None, :],
             value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def visible_keys(cols, row_lo, row_hi):
    """(rows, cols) mask: key `cols[j]` lies in row i's range [row_lo[i], row_hi[i])."""
    return (cols[None, :] >= row_lo[:, None]) & (cols[None, :] < row_hi[:, None])


@triton.jit
def loop_bounds(row_lo, row_hi, limit):
    """(key_lo, key_hi): the union of the rows' non-empty key ranges (empty: key_lo >= key_hi)."""
    nonempty = row_lo < row_hi
    key_lo = tl.min(tl.where(nonempty, row_lo, limit), axis=0)
    key_hi = tl.max(tl.where(nonempty, row_hi, 0), axis=0)
    return key_lo, key_hi


@triton.jit
def whole_blocks_end(row_lo, row_hi, key_lo, key_hi, BLOCK_N: tl.constexpr):
    """End of the run of whole key blocks, from key_lo, that every non-empty row of the block
    sees entirely: [key_lo, end) needs no mask (no per-row bounds, no key bound), so the loops
    split into unmasked blocks first and masked edge blocks (the diagonal, a partial last block,
    rows that start later) after. Empty rows may take garbage there; the caller zeroes them."""
    nonempty = row_lo < row_hi
    all_start_at_lo = tl.max(tl.where(nonempty, row_lo, key_lo), axis=0) <= key_lo
    earliest_hi = tl.min(tl.where(nonempty, row_hi, key_hi), axis=0)
    whole = tl.maximum(earliest_hi - key_lo, 0) // BLOCK_N * BLOCK_N
    return key_lo + tl.where(all_start_at_lo, whole, 0)


@triton.jit
def attend_block(q, acc, l_i, m_i, k_ptr, v_ptr, stride_kt, stride_vt, start_n, row_lo, row_hi,
                 key_hi, dims, dim_mask, qk_scale_log2, BLOCK_N: tl.constexpr,
                 MASKED: tl.constexpr, IEEE_DOTS: tl.constexpr):
    """One key block of the online softmax. Unmasked blocks are whole and seen by every row, so
    every score is finite and the running max needs no -inf guard."""
    cols = start_n + tl.arange(0, BLOCK_N)
    if MASKED:
        kv_mask = (cols < key_hi)[:, None] & dim_mask[None, :]
    else:
        kv_mask = dim_mask[None, :]
    k = load_rows(k_ptr, cols, stride_kt, dims, kv_mask)
    scores = dot(q, tl.trans(k), IEEE_DOTS) * qk_scale_log2
    if MASKED:
        visible = visible_keys(cols, row_lo, row_hi)
        scores = tl.where(visible, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    m_safe = m_new
    if MASKED:
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing seen yet
    p = tl.exp2(scores - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = load_rows(v_ptr, cols, stride_vt, dims, kv_mask)
    acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, IEEE_DOTS)
    return acc, l_i, m_new


@triton.jit
def attend(q, k_ptr, v_ptr, stride_kt, stride_vt, row_lo, row_hi, key_lo, key_hi, dims,
           dim_mask, qk_scale_log2, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
           HEAD_DIM: tl.constexpr, IEEE_DOTS: tl.constexpr):
    """Online softmax of a query block over key rows [key_lo, key_hi), row i seeing only keys
    [row_lo[i], row_hi[i]). Returns (out, lse): out (BLOCK_M, HEAD_DIM) fp32, lse in log2 units."""
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    whole_end = whole_blocks_end(row_lo, row_hi, key_lo, key_hi, BLOCK_N)
    for start_n in range(key_lo, whole_end, BLOCK_N):
        acc, l_i, m_i = attend_block(q, acc, l_i, m_i, k_ptr, v_ptr, stride_kt, stride_vt,
                                     start_n, row_lo, row_hi, key_hi, dims, dim_mask,
                                     qk_scale_log2, BLOCK_N, False, IEEE_DOTS)
    for start_n in range(whole_end, key_hi, BLOCK_N):
        acc, l_i, m_i = attend_block(q, acc, l_i, m_i, k_ptr, v_ptr, stride_kt, stride_vt,
                                     start_n, row_lo, row_hi, key_hi, dims, dim_mask,
                                     qk_scale_log2, BLOCK_N, True, IEEE_DOTS)
    seen = row_lo < row_hi  # not l_i > 0: empty rows may have summed unmasked blocks
    out = tl.where(seen[:, None], acc / tl.where(seen, l_i, 1.0)[:, None], 0.0)
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("inf"))
    return out, lse


@triton.jit
def softmax_backward(q, k, v, grad_out, lse, delta, visible, gate, qk_scale_log2,
                     GATED: tl.constexpr, MASKED: tl.constexpr, IEEE_DOTS: tl.constexpr):
    """(P, dS) of one (query block, key block) tile: P recomputed from the saved lse, and
    dS = P * (gate * dO V^T - delta), delta = rowsum(O * dO_inner)."""
    scores = dot(q, tl.trans(k), IEEE_DOTS)
    p = tl.exp2(scores * qk_scale_log2 - lse[:, None])
    if MASKED:  # unmasked: every row sees every key, or is empty (lse = +inf, so P = 0)
        p = tl.where(visible, p, 0.0)
    dp = dot(grad_out, tl.trans(v), IEEE_DOTS)
    if GATED:
        dp = dp * gate
    return p, p * (dp - delta[:, None])


@triton.jit
def dkdv_step(dk, dv, k, v, q, grad_out, lse, delta, visible, gate, qk_scale_log2,
              GATED: tl.constexpr, MASKED: tl.constexpr, IEEE_DOTS: tl.constexpr):
    """Add one query block's contribution to a key block's dK (unscaled) and dV; also returns
    the tile's dS (for a caller that adds dS K into dQ; unused, the compiler drops it)."""
    p, ds = softmax_backward(q, k, v, grad_out, lse, delta, visible, gate, qk_scale_log2,
                             GATED, MASKED, IEEE_DOTS)
    if GATED:
        p = p * gate
    dv += dot(tl.trans(p.to(grad_out.dtype)), grad_out, IEEE_DOTS)
    dk += dot(tl.trans(ds.to(q.dtype)), q, IEEE_DOTS)
    return dk, dv, ds


@triton.jit
def keys_visible_to_rows(cols, row_lo, row_hi):
    """(cols, rows) mask, visible_keys transposed: key `cols[j]` lies in row i's range."""
    return (cols[:, None] >= row_lo[None, :]) & (cols[:, None] < row_hi[None, :])


@triton.jit
def dkdv_step_keys_on_m(dk, dv, k, v, q, grad_out, lse, delta, visible_t, gate, qk_scale_log2,
                        GATED: tl.constexpr, MASKED: tl.constexpr, IEEE_DOTS: tl.constexpr):
    """dkdv_step computed transposed, keys on the M side of every dot: S^T = K Q^T and
    dP^T = V dO^T give P^T and dS^T directly, as the A operands of dV += P^T dO and
    dK += dS^T Q, so no register tile is transposed (Hopper's wgmma takes A from registers only
    untransposed: dkdv_step's trans(P) and trans(dS) go through shared memory), and with
    BLOCK_N = 128 keys every dot has M = 128, two m64 wgmmas, whatever BLOCK_M is. Returns dS^T.
    `visible_t` is (keys, rows) (keys_visible_to_rows)."""
    scores_t = dot(k, tl.trans(q), IEEE_DOTS)
    p_t = tl.exp2(scores_t * qk_scale_log2 - lse[None, :])
    if MASKED:
        p_t = tl.where(visible_t, p_t, 0.0)
    dp_t = dot(v, tl.trans(grad_out), IEEE_DOTS)
    if GATED:
        dp_t = dp_t * gate
    ds_t = p_t * (dp_t - delta[None, :])
    if GATED:
        p_t = p_t * gate
    dv += dot(p_t.to(grad_out.dtype), grad_out, IEEE_DOTS)
    dk += dot(ds_t.to(q.dtype), q, IEEE_DOTS)
    return dk, dv, ds_t


@triton.jit
def load_query_block(q_ptr, grad_out_ptr, lse_ptr, delta_ptr, rows, row_mask, stride_qt,
                     stride_dot, dims, dim_mask):
    """What the backward needs of a query block: q, dO, lse and delta (pointers at row 0 of the
    head; lse/delta rows of that head). Rows outside row_mask get lse = +inf, so P = 0."""
    mask = row_mask[:, None] & dim_mask[None, :]
    q = load_rows(q_ptr, rows, stride_qt, dims, mask)
    grad_out = load_rows(grad_out_ptr, rows, stride_dot, dims, mask)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=float("inf"))
    delta = tl.load(delta_ptr + rows, mask=row_mask, other=0.0)
    return q, grad_out, lse, delta


@triton.jit
def dq_step(dq, q, grad_out, lse, delta, k_ptr, v_ptr, stride_kt, stride_vt, start_n, row_lo,
            row_hi, key_hi, gate, dims, dim_mask, qk_scale_log2, GATED: tl.constexpr,
            BLOCK_N: tl.constexpr, MASKED: tl.constexpr, IEEE_DOTS: tl.constexpr):
    """Add one key block's contribution to a query block's dQ (unscaled). Masked blocks also
    bound the keys: past key_hi, P need not be 0 and K is loaded as 0, and inf * 0 is NaN."""
    cols = start_n + tl.arange(0, BLOCK_N)
    if MASKED:
        kv_mask = (cols < key_hi)[:, None] & dim_mask[None, :]
        visible = visible_keys(cols, row_lo, row_hi)
    else:
        kv_mask = dim_mask[None, :]
        visible = None
    k = load_rows(k_ptr, cols, stride_kt, dims, kv_mask)
    v = load_rows(v_ptr, cols, stride_vt, dims, kv_mask)
    _p, ds = softmax_backward(q, k, v, grad_out, lse, delta, visible, gate, qk_scale_log2,
                              GATED, MASKED, IEEE_DOTS)
    return dq + dot(ds.to(k.dtype), k, IEEE_DOTS)


@triton.jit
def dq_block(q, grad_out, lse, delta, k_ptr, v_ptr, stride_kt, stride_vt, row_lo, row_hi,
             key_lo, key_hi, gate, dims, dim_mask, qk_scale_log2, GATED: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
             IEEE_DOTS: tl.constexpr):
    """dQ (unscaled, fp32) of a query block over key rows [key_lo, key_hi), per-row bounds as in
    `attend`, whole blocks unmasked first. An empty row has lse = +inf, so P = 0 and dQ = 0."""
    dq = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    whole_end = whole_blocks_end(row_lo, row_hi, key_lo, key_hi, BLOCK_N)
    for start_n in range(key_lo, whole_end, BLOCK_N):
        dq = dq_step(dq, q, grad_out, lse, delta, k_ptr, v_ptr, stride_kt, stride_vt, start_n,
                     row_lo, row_hi, key_hi, gate, dims, dim_mask, qk_scale_log2, GATED,
                     BLOCK_N, False, IEEE_DOTS)
    for start_n in range(whole_end, key_hi, BLOCK_N):
        dq = dq_step(dq, q, grad_out, lse, delta, k_ptr, v_ptr, stride_kt, stride_vt, start_n,
                     row_lo, row_hi, key_hi, gate, dims, dim_mask, qk_scale_log2, GATED,
                     BLOCK_N, True, IEEE_DOTS)
    return dq


@triton.jit
def delta_kernel(out_ptr, grad_out_ptr, delta_ptr, ungated_ptr, gate_grad_ptr, stride_ot,
                 stride_oh, stride_dot, stride_doh, stride_ut, stride_uh, total_q, head_dim,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, GATE_GRAD: tl.constexpr):
    """delta[h, i] = sum_d out[i, h, d] * grad_out[i, h, d] in fp32 (the softmax backward's row
    term), in the (Hq, total_q) layout of the saved log-sum-exp. With GATE_GRAD, also this row
    block's sum of ungated[i, h, :] . grad_out[i, h, :] into gate_grad[block, h]: the gradient of
    the gate factor, reduced over blocks by the launcher (deterministic, no atomics)."""
    block = tl.program_id(0)
    head = tl.program_id(1)
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    mask = (rows < total_q)[:, None] & (dims < head_dim)[None, :]
    out = load_rows(out_ptr + head * stride_oh, rows, stride_ot, dims, mask).to(tl.float32)
    grad_out = load_rows(grad_out_ptr + head * stride_doh, rows, stride_dot, dims,
                         mask).to(tl.float32)
    tl.store(delta_ptr + head.to(tl.int64) * total_q + rows, tl.sum(out * grad_out, axis=1),
             mask=rows < total_q)
    if GATE_GRAD:
        ungated = load_rows(ungated_ptr + head * stride_uh, rows, stride_ut, dims,
                            mask).to(tl.float32)
        tl.store(gate_grad_ptr + block * tl.num_programs(1) + head, tl.sum(ungated * grad_out))


DELTA_ROWS = 32


# --------------------------------------------------------------------------------------------
# configurations: (BLOCK_M, BLOCK_N, num_warps, num_stages), chosen once per (arch, kernel, head
# dim, operand width) and never re-tuned per total length; both ops use them (their programs
# hold the same tiles). The two backward kernels have their own entries: dK/dV holds two
# (BLOCK_N, d) fp32 accumulators and dQ one (BLOCK_M, d), so they fit different tiles. Entries
# were chosen by the compile gate (registers, spills, wgmma), not yet by timing on a card.

INTERPRETER_CONFIG = (32, 32, 4, 1)
# Tiles every launch uses while forced_tiles() is active: (arch, option).
_forced_tiles: list[tuple[str, int] | None] = [None]

# Shared memory per forward program: Q (BM x D) + stages x (K + V) (BN x D), 2-byte elements.
# sm90 forward d=128: 32 KB + 3 x 32 KB = 128 KB of 227 KB. fp32 inputs (IEEE dots) get smaller
# tiles: their elements are twice as wide. The compile gate builds every entry.
CONFIGS = {
    **{("sm90", "fwd", d, "16bit"): (128, 64, 8, 3) for d in (16, 32, 64, 128)},
    ("sm90", "fwd", 256, "16bit"): (64, 32, 8, 2),
    **{("sm80", "fwd", d, "16bit"): (128, 64, 8, 2) for d in (16, 32, 64)},
    ("sm80", "fwd", 128, "16bit"): (128, 32, 8, 2),
    ("sm80", "fwd", 256, "16bit"): (64, 32, 8, 1),
    **{(arch, kind, d, "16bit"): (64, 64, 4, 2) for arch in ("sm90", "sm80")
       for kind in ("bwd_dkdv", "bwd_dq") for d in (16, 32)},
    **{("sm90", kind, 64, "16bit"): (64, 64, 4, 2) for kind in ("bwd_dkdv", "bwd_dq")},
    ("sm80", "bwd_dkdv", 64, "16bit"): (32, 64, 4, 2),
    ("sm80", "bwd_dq", 64, "16bit"): (64, 64, 8, 2),
    **{(arch, kind, 128, "16bit"): (64, 64, 8, 2) for arch in ("sm90", "sm80")
       for kind in ("bwd_dkdv", "bwd_dq")},
    # dK/dV's dots P^T dO and dS^T Q have M = BLOCK_N: 64 keys keep them on wgmma; 32 query rows
    # keep the program off the spill path (64 x 64 spilled 512-544 bytes)
    ("sm90", "bwd_dkdv", 256, "16bit"): (32, 64, 8, 1),
    ("sm90", "bwd_dq", 256, "16bit"): (64, 32, 8, 2),
    ("sm80", "bwd_dkdv", 256, "16bit"): (32, 32, 8, 1),
    ("sm80", "bwd_dq", 256, "16bit"): (64, 32, 8, 1),
    # The keys-on-M dK/dV pass (NVLM_KERNELS_KEYS_ON_M=1, dkdv_step_keys_on_m; head dims <= 128),
    # a candidate: 128 keys on M of every dot on sm_90 (2 x m64 wgmma, all 4 dots, GQA too), few
    # query rows per step. sm_90 registers on triton 3.9 (causal, GROUP 1 / 7): d = 32 at 4 warps
    # 213; d = 64 168 / 209 (4 warps: 255 and 56-160 bytes of spills); d = 128 with 16 rows 233 /
    # 240 (32 rows at 2 stages: 32 bytes of spills with GQA). d = 256 spilled 368-440 bytes in
    # every tile tried: the default orientation serves it.
    **{("sm90", "bwd_dkdv_kq", d, "16bit"): (32, 128, 4, 2) for d in (16, 32)},
    ("sm90", "bwd_dkdv_kq", 64, "16bit"): (32, 128, 8, 2),
    ("sm90", "bwd_dkdv_kq", 128, "16bit"): (16, 128, 8, 2),
    **{("sm80", "bwd_dkdv_kq", d, "16bit"): (32, 64, 4, 2) for d in (16, 32, 64)},
    ("sm80", "bwd_dkdv_kq", 128, "16bit"): (32, 64, 8, 2),
    **{(arch, "fwd", d, "fp32"): (64, 32, 4, 2) for arch in ("sm90", "sm80")
       for d in (16, 32, 64, 128)},
    **{(arch, "fwd", 256, "fp32"): (32, 32, 4, 1) for arch in ("sm90", "sm80")},
    **{(arch, kind, d, "fp32"): (32, 32, 4, 1) for arch in ("sm90", "sm80")
       for kind in ("bwd_dkdv", "bwd_dq") for d in (16, 32, 64, 128)},
    **{(arch, "bwd_dkdv_kq", d, "fp32"): (32, 32, 4, 1) for arch in ("sm90", "sm80")
       for d in (16, 32, 64, 128)},
    **{(arch, kind, 256, "fp32"): (16, 16, 4, 1) for arch in ("sm90", "sm80")
       for kind in ("bwd_dkdv", "bwd_dq")},
}


# Alternatives the opt-in tuner (nvlm_kernels/_tuning.py) times against the entry above, where the
# compile gate left more than one good tile: sm_90, 16-bit, head dims 128 (the ViT's and the
# large LLMs') and 64 (Qwen2-0.5B's), each free of spills on triton 3.9 (on 3.6, the GPU image's,
# the keys-on-M d = 128 alternative spills 8 bytes with atomic dQ: docs/results.md, section 6).
# The compile gate builds them all. Tried and left out, sm_90 bf16, triton 3.9 (2026-11-28): forward d = 128 at
# 128 x 128 / 8 warps (56 bytes of spills at 255 registers, 160 KB of shared memory) and 128 x 64
# / 4 warps (336-360 bytes); the default-orientation dK/dV with 128-key blocks (64 x 128 / 8
# warps: 24 bytes at d = 64, 96 with atomic dQ; 488-832 at d = 128). A 128-key atomic-dQ
# backward is the keys-on-M pass with NVLM_KERNELS_ATOMIC_DQ=1, whose tiles compile clean.
ALTERNATIVES = {
    ("sm90", "fwd", 128, "16bit"): ((128, 64, 8, 2),),
    ("sm90", "bwd_dkdv", 128, "16bit"): ((32, 64, 8, 2),),
    ("sm90", "bwd_dq", 128, "16bit"): ((128, 64, 8, 2), (128, 32, 8, 2)),
    ("sm90", "fwd", 64, "16bit"): ((128, 128, 8, 2), (128, 64, 4, 2)),   # 4 warps: 244-254 regs
    ("sm90", "bwd_dkdv", 64, "16bit"): ((32, 64, 4, 2),),
    ("sm90", "bwd_dq", 64, "16bit"): ((128, 32, 8, 2),),
    ("sm90", "bwd_dkdv_kq", 128, "16bit"): ((32, 128, 8, 1),),   # 251 / 255 registers
    ("sm90", "bwd_dkdv_kq", 64, "16bit"): ((16, 128, 8, 2), (32, 64, 4, 2)),
}


def shipped_configs() -> Iterator[tuple[tuple[str, str, int, str], int, tuple[int, int, int, int]]]:
    """(key, index, config) of every configuration a launch can use: index 0 is the table's,
    1... its alternatives. The compile gate builds each."""
    for key, config in CONFIGS.items():
        for index, option in enumerate((config,) + ALTERNATIVES.get(key, ())):
            yield key, index, option


@functools.lru_cache(maxsize=None)
def device_arch(device: torch.device) -> str:
    """The config table's arch of a CUDA device, asked once per device (not per launch)."""
    return "sm90" if torch.cuda.get_device_capability(device)[0] >= 9 else "sm80"


def config_key(device: torch.device, head_dim_padded: int, kind: str,
               dtype: torch.dtype) -> tuple[str, str, int, str]:
    arch = device_arch(device)
    width = "fp32" if dtype == torch.float32 else "16bit"
    return arch, kind, min(head_dim_padded, 256), width


def candidates(device: torch.device, head_dim_padded: int, kind: str,
               dtype: torch.dtype) -> tuple[tuple[int, int, int, int], ...]:
    """The shipped configuration first, then its alternatives (the interpreter has one)."""
    if _forced_tiles[0] is not None:
        return (_forced_config(device, head_dim_padded, kind, dtype),)
    if device.type != "cuda":
        return (INTERPRETER_CONFIG,)
    key = config_key(device, head_dim_padded, kind, dtype)
    return (CONFIGS[key],) + ALTERNATIVES.get(key, ())


def _forced_config(device: torch.device, head_dim_padded: int, kind: str,
                   dtype: torch.dtype) -> tuple[int, int, int, int]:
    arch, option = _forced_tiles[0]
    if device.type == "cuda":
        key = config_key(device, head_dim_padded, kind, dtype)
        if key[0] != arch:
            raise ValueError(f"forced_tiles({arch!r}) on a {key[0]} device: its tiles may not "
                             f"fit this card; force the device's own arch")
    else:   # the interpreter checks block arithmetic only: the 16-bit tiles have the options
        key = (arch, kind, min(head_dim_padded, 256), "16bit")
    options = (CONFIGS[key],) + ALTERNATIVES.get(key, ())
    return options[min(option, len(options) - 1)]


@contextlib.contextmanager
def forced_tiles(arch: str, option: int = 0) -> Iterator[None]:
    """Inside the block every attention launch uses `arch`'s configuration ("sm90" or "sm80"):
    its table entry (option 0) or its tuner alternative `option` (the last one where a kernel
    has fewer), untimed. Under the interpreter it takes the 16-bit tiles whatever the dtype: its
    own tiles are square and small, so this is how the block arithmetic of every tile a card
    can launch (128-key blocks, 16-row steps, M != N) is checked on the CPU. On a GPU it checks
    the alternatives the tuner may pick; `arch` must then be the device's."""
    if arch not in ("sm90", "sm80") or option < 0:
        raise ValueError(f"forced_tiles: arch must be 'sm90' or 'sm80' and option >= 0; got "
                         f"{arch!r}, {option}")
    previous = _forced_tiles[0]
    _forced_tiles[0] = (arch, option)
    try:
        yield
    finally:
        _forced_tiles[0] = previous


def launch_tuned(op: str, variant: object, device: torch.device, head_dim_padded: int,
                 kind: str, dtype: torch.dtype,
                 launch: Callable[[tuple[int, int, int, int]], None]) -> None:
    """launch(config) with the shipped configuration, or with the tuner's pick when tuning is on
    (keyed on the op, kernel, head dim, dtype and `variant`: causal or gated, never lengths)."""
    options = candidates(device, head_dim_padded, kind, dtype)
    if len(options) == 1:
        launch(options[0])
        return
    arch = config_key(device, head_dim_padded, kind, dtype)[0]
    key = (op, kind, arch, head_dim_padded, str(dtype).removeprefix("torch."), variant)
    launch(pick(key, options, launch))


def head_dim_padded(head_dim: int) -> int:
    """Head dims are padded to the next power of two (>= 16, a dot's minimum) and masked."""
    return max(16, triton.next_power_of_2(head_dim))


def unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def check_grid(op: str, **axes: int) -> None:
    """The launch grid's axes 1 and 2 (sequences, heads) are limited to 65535 programs by CUDA."""
    too_large = {name: size for name, size in axes.items() if size > 65535}
    if too_large:
        raise ValueError(f"the triton {op} launches one program per {' x '.join(axes)} on grid "
                         f"axes limited to 65535; got {too_large}")
