"""Triton pixel shuffle fused with the projector's LayerNorm, forward and backward.

Forward: one program per output row (one token of the folded grid, width D = s*s*C). It gathers
the row's s*s input segments as one [parts, C] tile (each segment contiguous along C), computes
mean and variance in fp32 from registers (two-pass over the tile, no cancellation), and writes
the normalized row once: each input element is read once and each output element written once,
where eager PyTorch makes four passes (permute copy read + write, layer_norm read + write).

Backward: with xhat = (x - mean) * rstd and g = dy * weight,
    dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),
written straight back through the inverse permutation. dweight = sum(dy * xhat) and
dbias = sum(dy) over rows use a deterministic two-stage reduction: each program handles a fixed,
contiguous range of rows and accumulates its partial sums in registers, then stores them as one
row of a (programs, D) fp32 buffer; a second kernel adds those rows in program order. The number
of programs depends only on the row count and the card's SM count, so a run on a given card is
bitwise reproducible.

Registers (compile gate, sm_90, C = 3200 padded to 4 x 4096, 16 warps): forward 66 per thread
uncapped, which let one 512-thread program run per SM; it is launched with maxnreg = 64 (64, no
spills), so two programs share an SM and one's loads overlap the other's reductions. Prediction
for the GPU run: the forward moves from one row in flight per SM to two, worth up to ~1.3-1.5x on
a latency-bound row loop (it reads 25.6 KB and writes 25.6 KB per row at C = 3200 bf16); it
should reach >= 80 % of the card's copy bandwidth. The partial sums of the backward are added
by 100 one-warp programs of 128 columns (D = 12800), not 13 of 1024.

The backward takes 128 registers (the cap at 512 threads) and spills 264-480 bytes per thread: the
two fp32 accumulators plus the row in flight exceed the register file (32 warps spill 184-288
bytes). The compile gate accepts it as a measured exception (compile_specs/); keeping the
accumulators out of registers (as the CUDA kernel does in shared memory) is the fix to try once a
GPU can time it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._memory import new_output
from .._registration import register_pixel_shuffle_layernorm
from .pixel_shuffle import segment_offset

# Widest row kept in registers: s*s * next_pow2(C) elements. NVLM's 4 x 4096 (C = 3200) fits.
_MAX_TILE = 16384
# Programs of the backward's first stage on the CPU interpreter (on a GPU: one per SM, since the
# backward's 128 registers x 512 threads fill an SM). One per SM keeps the (programs, D) fp32
# partials small: 132 x 12800 x 4 B x 2 = 13.5 MB on an H100, against 3 x 92 MB of data traffic.
_INTERPRETER_PROGRAMS = 4
# Columns per program of the partial sums' reduction: 128 fp32 at one warp is one 16-byte vector
# per thread, and D = 12800 gives 100 programs (1024 columns gave 13, each adding 132 rows).
_COLUMN_BLOCK = 128
_COLUMN_WARPS = 1


def _backward_programs(rows: int, device: torch.device) -> int:
    if device.type == "cuda":
        slots = torch.cuda.get_device_properties(device).multi_processor_count
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
def _psln_bwd_kernel(grad_ptr, x_ptr, weight_ptr, mean_ptr, rstd_ptr, grad_x_ptr,
                     partial_weight_ptr, partial_bias_ptr, rows, rows_per_program, grid_h,
                     grid_w, out_w, out_tokens, channels, SCALE: tl.constexpr,
                     PARTS: tl.constexpr, BLOCK_C: tl.constexpr):
    program = tl.program_id(0)
    width = SCALE * SCALE * channels
    first = program * rows_per_program
    last = tl.minimum(first + rows_per_program, rows)
    parts = tl.arange(0, PARTS)[:, None]
    cols = tl.arange(0, BLOCK_C)[None, :]
    row_offsets = parts * channels + cols
    grad_weight = tl.zeros((PARTS, BLOCK_C), dtype=tl.float32)
    grad_bias = tl.zeros((PARTS, BLOCK_C), dtype=tl.float32)
    for row in range(first, last):
        x_offsets, row_offsets, mask = _row_tile(row, grid_h, grid_w, out_w, out_tokens,
                                                 channels, SCALE, PARTS, BLOCK_C)
        x = tl.load(x_ptr + x_offsets, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(grad_ptr + tl.cast(row, tl.int64) * width + row_offsets, mask=mask,
                     other=0.0).to(tl.float32)
        # the weight is re-read per row from L1/L2 rather than held: registers are the limit
        weight = tl.load(weight_ptr + row_offsets, mask=mask, other=0.0).to(tl.float32)
        xhat = tl.where(mask, (x - tl.load(mean_ptr + row)) * tl.load(rstd_ptr + row), 0.0)
        g = dy * weight
        g_mean = tl.sum(tl.sum(g, axis=1), axis=0) / width
        gx_mean = tl.sum(tl.sum(g * xhat, axis=1), axis=0) / width
        dx = (g - g_mean - xhat * gx_mean) * tl.load(rstd_ptr + row)
        tl.store(grad_x_ptr + x_offsets, dx.to(grad_x_ptr.dtype.element_ty), mask=mask)
        grad_weight += dy * xhat
        grad_bias += dy
    mask = (parts < SCALE * SCALE) & (cols < channels)
    partial_offsets = program.to(tl.int64) * width + row_offsets
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
    programs = _backward_programs(rows, x.device)
    rows_per_program = triton.cdiv(rows, programs) if rows else 0
    partial_weight = torch.empty((programs, width), dtype=torch.float32, device=x.device)
    partial_bias = torch.empty((programs, width), dtype=torch.float32, device=x.device)
    _psln_bwd_kernel[(programs,)](grad_out, x, weight, mean, rstd, grad_x, partial_weight,
                                  partial_bias, rows, rows_per_program, grid_h, grid_w, out_w,
                                  out_tokens, channels, SCALE=scale, PARTS=parts, BLOCK_C=block_c,
                                  num_warps=_num_warps(parts * block_c))
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
