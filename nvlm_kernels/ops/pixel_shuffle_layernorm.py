"""Triton pixel shuffle fused with the projector's LayerNorm, forward and backward.

Forward: one program per output row (one token of the folded grid, width D = s*s*C). It gathers
the row's s*s input segments as one [parts, C] tile (each segment contiguous along C), computes
mean and variance in fp32 from registers (two-pass over the tile, no cancellation), and writes
the normalized row once: each input element is read once and each output element written once,
where eager PyTorch makes four passes (permute copy read + write, layer_norm read + write).

Registers (compile gate, sm_90, C = 3200 padded to 4 x 4096, 16 warps): forward 66 per thread
uncapped, which let one 512-thread program run per SM; it is launched with maxnreg = 64 (64, no
spills), so two programs share an SM and one's loads overlap the other's reductions. Prediction
for the GPU run: the forward moves from one row in flight per SM to two, worth up to ~1.3-1.5x on
a latency-bound row loop (it reads 25.6 KB and writes 25.6 KB per row at C = 3200 bf16); it
should reach >= 80 % of the card's copy bandwidth.

Backward: with xhat = (x - mean) * rstd and g = dy * weight,
    dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),
written straight back through the inverse permutation. dweight = sum(dy * xhat) and
dbias = sum(dy) over rows use a deterministic two-stage reduction: each program handles a fixed,
contiguous range of rows and accumulates its partial sums in fp32 registers, then stores them as
one row of a (programs, D) fp32 buffer; a second kernel adds those rows in program order (100
one-warp programs of 128 columns at D = 12800). The number of programs depends only on the row
count and the card's SM count, so a run on a given card is bitwise reproducible.

The accumulators span the row: 2 x 16384 fp32 at NVLM's 4 x 4096 tile, half of an SM's register
file. So the row itself passes through registers one C-wide segment at a time: the backward
loops over (row, segment) steps, each adding its segment to the accumulators and to the row sums;
after a row's last segment it reduces the row sums and makes a second pass over the segments to
write dx, re-reading x, dy and weight from L1 (the dx pass recomputes xhat and g). Triton's
pipeliner copies the next STAGES - 1 segments into shared memory (cp.async.ca, which also fills
L1) while a step computes, across row ends: the next row's first segments are in flight during
a row's reduction and dx pass, and no registers are held for them. DRAM traffic is unchanged:
x and dy are read once, dx is written once, the weight stays in L1/L2. Where the second pass
misses L1 (fp32 rows, 102 KB, or the A100's smaller L1) it hits L2.

Compile gate, registers per thread / spill bytes at sm_80 | sm_90 (before: one program per SM of
16 warps at C <= 4096, of 8 warps at C <= 1024, no pipelining):
    bf16 C <= 4096   128/264 | 128/304  ->  214/0 | 215/0   8 warps, 4 stages, 72 KB shared
    fp16 C <= 4096   128/288 | 128/304  ->  216/0 | 216/0   8 warps, 4 stages, 72 KB
    fp32 C <= 4096   128/480 | 128/456  ->  230/0 | 224/0   8 warps, 3 stages, 96 KB
    bf16 C <= 1024   127/0 | 125/0      ->  126/0 | 168/0   2 programs x 4 warps, 7 stages, 36 KB
    fp16 C <= 1024   128/0 | 123/0      ->  128/0 | 168/0   2 programs x 4 warps, 7 stages, 36 KB
    fp32 C <= 1024   162/0 | 156/0      ->  126/0 | 154/0   2 programs x 4 warps, 4 stages, 36 KB
Tried and measured: the segment loop unrolled per row still spills (up to 460 bytes, fp32) at 16
or 8 warps, since ptxas hoists all of a row's loads next to the accumulators; carrying the next
segment in registers across a runtime loop spills nothing but, for 16-bit data, unpacks it at the
loop's back edge, i.e. waits for the "prefetch" within the same iteration; the row -> token index
math in int64 (segment_offset) calls a 64-bit division subroutine.

Prediction for the GPU run (H200, C = 3200 bf16): a row moves 76.8 KB of DRAM traffic (x and dy
25.6 KB each read, dx 25.6 KB written), 2.1 us per row at an SM's 36 GB/s share of HBM. The old
kernel issued a row's loads, waited ~1 us for them, had nothing in flight during its reduction
and dx math, and moved its 264-304 spilled bytes per thread through L1 every row; this one keeps
~38 KB of x and dy in flight per SM throughout. The cost moves to instruction issue: ~2,200 SASS
instructions per warp per row (the old kernel ~1,000, at twice the warps), ~4,400 issue cycles
per SM sub-partition per row against ~4,200 cycles of DRAM time. Expected: 1.1-1.3x faster,
>= 70 % of copy bandwidth. If the profile shows the steps issue-bound, two segments per step
would halve the ~120 instructions of addressing and pipeline bookkeeping each step carries.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._memory import new_output
from .._registration import register_pixel_shuffle_layernorm
from .pixel_shuffle import segment_offset

# Widest row in registers (the forward's tile, the backward's accumulators): s*s * next_pow2(C)
# elements. NVLM's 4 x 4096 (C = 3200) fits.
_MAX_TILE = 16384
# Programs of the backward's first stage on the CPU interpreter (on a GPU: see
# _backward_programs). Few programs keep the (programs, D) fp32 partials small: 132 x 12800 x 4 B
# x 2 = 13.5 MB on an H100, against 3 x 92 MB of data traffic.
_INTERPRETER_PROGRAMS = 4
# Warps per SM of the backward: one 8-warp program fills the register file at NVLM's tile (its
# fp32 accumulators alone take 128 registers per thread); narrower tiles run two 4-warp programs.
_BACKWARD_WARPS_PER_SM = 8
# Bytes of x and dy the backward keeps in flight per SM, as cp.async copies into shared memory:
# ~48 KB covers an H200 SM's share of HBM bandwidth (36 GB/s) over ~1 us of loaded latency.
_BACKWARD_BYTES_IN_FLIGHT = 48 * 1024
# Columns per program of the partial sums' reduction: 128 fp32 at one warp is one 16-byte vector
# per thread, and D = 12800 gives 100 programs (1024 columns gave 13, each adding 132 rows).
_COLUMN_BLOCK = 128
_COLUMN_WARPS = 1


def _backward_programs(rows: int, device: torch.device, warps: int) -> int:
    if device.type == "cuda":
        slots = torch.cuda.get_device_properties(device).multi_processor_count
        slots *= _BACKWARD_WARPS_PER_SM // warps
    else:
        slots = _INTERPRETER_PROGRAMS
    return max(1, min(rows, slots))


def _tile(channels: int, scale: int) -> tuple[int, int]:
    parts, block_c = triton.next_power_of_2(scale * scale), triton.next_power_of_2(channels)
    if parts * block_c > _MAX_TILE:
        raise ValueError(f"the triton pixel_shuffle_layernorm keeps a row of {scale}^2 x C "
                         f"(padded to {parts} x {block_c}) in registers, at most {_MAX_TILE} "
                         f"elements; C = {channels} is too wide: use the native or torch backend")
    return parts, block_c


def _num_warps(tile: int) -> int:
    # ~16 fp32 values of each row-sized tensor per thread
    return max(4, min(16, tile // 512))


def _backward_warps(tile: int) -> int:
    return 8 if tile > 4096 else 4


def _backward_stages(block_c: int, element_size: int, warps: int) -> int:
    """Pipeline depth of the backward's segment loop: stages - 1 segments (x, dy, weight) are
    being copied while one is reduced. At 4 x 4096: 4 stages for 16-bit (72 KB of shared memory),
    3 for fp32 (96 KB)."""
    per_program = _BACKWARD_BYTES_IN_FLIGHT * warps // _BACKWARD_WARPS_PER_SM
    return 1 + max(2, min(6, per_program // (2 * block_c * element_size)))


def _forward_max_registers(num_warps: int) -> int | None:
    """The forward's register cap: two programs per SM (65536 registers) at 16 warps need <= 64
    per thread; uncapped it takes 66 (sm_90, C = 3200), so one program ran per SM. Capped, the
    compile gate measures 64 and no spills. Narrower tiles fit two programs uncapped."""
    return 64 if num_warps == 16 else None


@triton.jit
def _row_tile(row, grid_h, grid_w, out_w, out_tokens, channels, SCALE: tl.constexpr,
              PARTS: tl.constexpr, BLOCK_C: tl.constexpr):
    """Offsets of one output row's elements in x, in the output row, and their mask."""
    parts = tl.arange(0, PARTS)[:, None]
    cols = tl.arange(0, BLOCK_C)[None, :]
    mask = (parts < SCALE * SCALE) & (cols < channels)
    x_offsets = segment_offset(row, parts, grid_h, grid_w, out_w, out_tokens, channels, SCALE) + cols
    row_offsets = parts * channels + cols
    return x_offsets, row_offsets, mask


@triton.jit
def _psln_fwd_kernel(x_ptr, weight_ptr, bias_ptr, out_ptr, mean_ptr, rstd_ptr, grid_h, grid_w,
                     out_w, out_tokens, channels, eps, SCALE: tl.constexpr, PARTS: tl.constexpr,
                     BLOCK_C: tl.constexpr):
    row = tl.program_id(0)
    width = SCALE * SCALE * channels
    x_offsets, row_offsets, mask = _row_tile(row, grid_h, grid_w, out_w, out_tokens, channels,
                                             SCALE, PARTS, BLOCK_C)
    x = tl.load(x_ptr + x_offsets, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(tl.sum(x, axis=1), axis=0) / width
    centered = tl.where(mask, x - mean, 0.0)
    variance = tl.sum(tl.sum(centered * centered, axis=1), axis=0) / width
    rstd = 1.0 / tl.sqrt(variance + eps)
    weight = tl.load(weight_ptr + row_offsets, mask=mask, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + row_offsets, mask=mask, other=0.0).to(tl.float32)
    out = centered * rstd * weight + bias
    tl.store(out_ptr + tl.cast(row, tl.int64) * width + row_offsets,
             out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _add_pairs(a0, b0, a1, b1):
    return a0 + a1, b0 + b1


@triton.jit
def _segment_offsets(patch, part, grid_w, channels, cols, SCALE: tl.constexpr):
    """Offsets in x of segment `part` of the output row whose segment 0 is input token `patch`."""
    return (patch + part // SCALE * grid_w + part % SCALE).to(tl.int64) * channels + cols


@triton.jit
def _psln_bwd_kernel(grad_ptr, x_ptr, weight_ptr, mean_ptr, rstd_ptr, grad_x_ptr,
                     partial_weight_ptr, partial_bias_ptr, rows, rows_per_program, grid_h,
                     grid_w, out_w, out_tokens, channels, SCALE: tl.constexpr,
                     PARTS: tl.constexpr, BLOCK_C: tl.constexpr, STAGES: tl.constexpr):
    program = tl.program_id(0)
    segments: tl.constexpr = SCALE * SCALE
    width = segments * channels
    first = program * rows_per_program
    last = tl.minimum(first + rows_per_program, rows)
    parts = tl.arange(0, PARTS)[:, None]
    cols = tl.arange(0, BLOCK_C)[None, :]
    col_mask = cols < channels
    # output token (image, token_row, token_col) of the current row, advanced once per row
    # rather than divided out of the row index per segment
    out_h = out_tokens // out_w
    image = first // out_tokens
    token_row = first % out_tokens // out_w
    token_col = first % out_w
    grad_weight = tl.zeros((PARTS, BLOCK_C), dtype=tl.float32)
    grad_bias = tl.zeros((PARTS, BLOCK_C), dtype=tl.float32)
    # per-thread partial row sums: a reshape that stays within each thread's registers
    g_sum = tl.zeros((BLOCK_C // 4,), dtype=tl.float32)
    gx_sum = tl.zeros((BLOCK_C // 4,), dtype=tl.float32)
    # One step per segment, so a [BLOCK_C] slice of the row is in registers at a time; the
    # pipeliner copies the next STAGES - 1 segments (across rows) into shared memory meanwhile.
    for step in tl.range(first * segments, last * segments, num_stages=STAGES):
        row = step // segments
        part = step % segments
        patch = (image * grid_h + SCALE * token_row) * grid_w + SCALE * token_col
        x_offsets = _segment_offsets(patch, part, grid_w, channels, cols, SCALE)
        # .ca: the copies also fill L1, where the row's second pass below finds them
        x = tl.load(x_ptr + x_offsets, mask=col_mask, other=0.0,
                    cache_modifier=".ca").to(tl.float32)
        dy = tl.load(grad_ptr + tl.cast(step, tl.int64) * channels + cols, mask=col_mask,
                     other=0.0, cache_modifier=".ca").to(tl.float32)
        weight = tl.load(weight_ptr + part * channels + cols, mask=col_mask, other=0.0,
                         cache_modifier=".ca").to(tl.float32)
        mean = tl.load(mean_ptr + row)
        rstd = tl.load(rstd_ptr + row)
        xhat = x * rstd - mean * rstd  # one FFMA; in padding columns dy = 0 cancels it
        g = dy * weight
        g_sum += tl.sum(tl.reshape(g, (BLOCK_C // 4, 4)), axis=1)
        gx_sum += tl.sum(tl.reshape(g * xhat, (BLOCK_C // 4, 4)), axis=1)
        for k in tl.static_range(segments):  # a uniform branch per segment, not a select each
            if part == k:
                grad_weight = tl.where(parts == k, grad_weight + dy * xhat, grad_weight)
                grad_bias = tl.where(parts == k, grad_bias + dy, grad_bias)
        if part == segments - 1:
            g_mean, gx_mean = tl.reduce((g_sum, gx_sum), 0, _add_pairs)
            g_rstd = g_mean / width * rstd
            gx_rstd = gx_mean / width * rstd
            g_sum = tl.zeros((BLOCK_C // 4,), dtype=tl.float32)
            gx_sum = tl.zeros((BLOCK_C // 4,), dtype=tl.float32)
            # dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) from the row's segments re-read
            # in L1, not held in registers next to the accumulators. A runtime loop: unrolled,
            # ptxas hoists all of the row's loads at once and spills.
            for j in range(segments):
                x_offsets = _segment_offsets(patch, j, grid_w, channels, cols, SCALE)
                x = tl.load(x_ptr + x_offsets, mask=col_mask).to(tl.float32)
                dy = tl.load(grad_ptr + tl.cast(row * segments + j, tl.int64) * channels + cols,
                             mask=col_mask).to(tl.float32)
                weight = tl.load(weight_ptr + j * channels + cols, mask=col_mask).to(tl.float32)
                xhat = x * rstd - mean * rstd
                dx = dy * weight * rstd - (xhat * gx_rstd + g_rstd)
                tl.store(grad_x_ptr + x_offsets, dx.to(grad_x_ptr.dtype.element_ty), mask=col_mask)
        token_col += part == segments - 1
        token_row += token_col == out_w
        token_col = tl.where(token_col == out_w, 0, token_col)
        image += token_row == out_h
        token_row = tl.where(token_row == out_h, 0, token_row)
    mask = (parts < segments) & col_mask
    partial_offsets = program.to(tl.int64) * width + parts * channels + cols
    tl.store(partial_weight_ptr + partial_offsets, grad_weight, mask=mask)
    tl.store(partial_bias_ptr + partial_offsets, grad_bias, mask=mask)


@triton.jit
def _sum_partials_kernel(partial_weight_ptr, partial_bias_ptr, grad_weight_ptr, grad_bias_ptr,
                         programs, width, BLOCK: tl.constexpr):
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    total_weight = tl.zeros((BLOCK,), dtype=tl.float32)
    total_bias = tl.zeros((BLOCK,), dtype=tl.float32)
    for program in range(programs):  # in program order: deterministic
        offsets = tl.cast(program, tl.int64) * width + cols
        total_weight += tl.load(partial_weight_ptr + offsets, mask=mask, other=0.0)
        total_bias += tl.load(partial_bias_ptr + offsets, mask=mask, other=0.0)
    tl.store(grad_weight_ptr + cols, total_weight.to(grad_weight_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_bias_ptr + cols, total_bias.to(grad_bias_ptr.dtype.element_ty), mask=mask)


def _geometry(scale: int, grid_h: int, grid_w: int) -> tuple[int, int]:
    out_w = grid_w // scale
    return out_w, (grid_h // scale) * out_w


@torch.library.custom_op("nvlm_triton::pixel_shuffle_layernorm", mutates_args=())
def _psln_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, scale: int,
             grid_h: int, grid_w: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x, weight, bias = x.contiguous(), weight.contiguous(), bias.contiguous()
    n, _, channels = x.shape
    parts, block_c = _tile(channels, scale)
    out_w, out_tokens = _geometry(scale, grid_h, grid_w)
    rows = n * out_tokens
    out = new_output((n, out_tokens, channels * scale * scale), dtype=x.dtype, device=x.device)
    mean = new_output((n, out_tokens), dtype=torch.float32, device=x.device)
    rstd = new_output((n, out_tokens), dtype=torch.float32, device=x.device)
    if rows:
        warps = _num_warps(parts * block_c)
        _psln_fwd_kernel[(rows,)](x, weight, bias, out, mean, rstd, grid_h, grid_w, out_w,
                                  out_tokens, channels, eps, SCALE=scale, PARTS=parts,
                                  BLOCK_C=block_c, num_warps=warps,
                                  maxnreg=_forward_max_registers(warps))
    return out, mean, rstd


@torch.library.custom_op("nvlm_triton::pixel_shuffle_layernorm_backward", mutates_args=())
def _psln_backward_op(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                      mean: torch.Tensor, rstd: torch.Tensor, scale: int, grid_h: int,
                      grid_w: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_out, x, weight = grad_out.contiguous(), x.contiguous(), weight.contiguous()
    n, _, channels = x.shape
    width = channels * scale * scale
    parts, block_c = _tile(channels, scale)
    out_w, out_tokens = _geometry(scale, grid_h, grid_w)
    rows = n * out_tokens
    grad_x = new_output(x.shape, dtype=x.dtype, device=x.device)
    grad_weight = new_output((width,), dtype=weight.dtype, device=x.device)
    grad_bias = new_output((width,), dtype=weight.dtype, device=x.device)
    warps = _backward_warps(parts * block_c)
    programs = _backward_programs(rows, x.device, warps)
    rows_per_program = triton.cdiv(rows, programs) if rows else 0
    partial_weight = torch.empty((programs, width), dtype=torch.float32, device=x.device)
    partial_bias = torch.empty((programs, width), dtype=torch.float32, device=x.device)
    _psln_bwd_kernel[(programs,)](grad_out, x, weight, mean, rstd, grad_x, partial_weight,
                                  partial_bias, rows, rows_per_program, grid_h, grid_w, out_w,
                                  out_tokens, channels, SCALE=scale, PARTS=parts, BLOCK_C=block_c,
                                  STAGES=_backward_stages(block_c, x.element_size(), warps),
                                  num_warps=warps)
    _sum_partials_kernel[(triton.cdiv(width, _COLUMN_BLOCK),)](
        partial_weight, partial_bias, grad_weight, grad_bias, programs, width,
        BLOCK=_COLUMN_BLOCK, num_warps=_COLUMN_WARPS)
    return grad_x, grad_weight, grad_bias


register_pixel_shuffle_layernorm(_psln_op, _psln_backward_op)


def pixel_shuffle_layernorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                            eps: float = 1e-5, scale: int = 2,
                            grid: tuple[int, int] | None = None) -> torch.Tensor:
    """The triton backend of nvlm_kernels.pixel_shuffle_layernorm (inputs already validated)."""
    grid_h, grid_w = grid
    out, _mean, _rstd = _psln_op(x, weight.to(x.dtype), bias.to(x.dtype), float(eps), scale,
                                 grid_h, grid_w)
    return out
