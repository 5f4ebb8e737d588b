"""Triton pixel shuffle (NVLM "v2" token fold): a permutation copy, forward and backward.

x (N, h*w, C) -> out (N, (h/s)*(w/s), s*s*C). Output row `row` is s*s contiguous segments of C
channels; segment k = (i, j) (i-major) comes from input patch (s*r + i, s*c + j) of output token
(r, c) (docs/nvlm.md section 4). A program copies one channel block of one segment, so every load and
store runs along C, contiguous on both sides: with C a multiple of 8 (bf16) the compiler emits
16-byte accesses. The backward is the same copy in the other direction.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._memory import new_output
from .._registration import register_pixel_shuffle

# Channels per program: 1024 bf16 = 2 KB per program, enough in flight per SM to saturate HBM
# on a pure copy while keeping C = 3200 at 4 blocks (the last 1/8 masked).
_MAX_BLOCK_C = 1024


@triton.jit
def segment_offset(row, part, grid_h, grid_w, out_w, out_tokens, channels,
                   SCALE: tl.constexpr):
    """Element offset in a contiguous x (N, grid_h*grid_w, C) of segment `part` of output `row`."""
    row = tl.cast(row, tl.int64)
    n = row // out_tokens
    token = row % out_tokens
    r = token // out_w
    c = token % out_w
    i = part // SCALE
    j = part % SCALE
    return ((n * grid_h + SCALE * r + i) * grid_w + SCALE * c + j) * channels


@triton.jit
def _pixel_shuffle_kernel(src_ptr, dst_ptr, grid_h, grid_w, out_w, out_tokens, channels,
                          SCALE: tl.constexpr, BLOCK_C: tl.constexpr, INVERSE: tl.constexpr):
    # axis 0: (output row, segment); axis 1: channel block
    row = tl.program_id(0) // (SCALE * SCALE)
    part = tl.program_id(0) % (SCALE * SCALE)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = cols < channels
    x_offsets = segment_offset(row, part, grid_h, grid_w, out_w, out_tokens, channels, SCALE) + cols
    out_offsets = (row.to(tl.int64) * (SCALE * SCALE) + part) * channels + cols
    if INVERSE:  # src is grad_out (shuffled layout), dst is grad_x (token layout)
        tl.store(dst_ptr + x_offsets, tl.load(src_ptr + out_offsets, mask=mask), mask=mask)
    else:
        tl.store(dst_ptr + out_offsets, tl.load(src_ptr + x_offsets, mask=mask), mask=mask)


def _launch(src: torch.Tensor, dst: torch.Tensor, channels: int, scale: int, grid_h: int,
            grid_w: int, inverse: bool) -> None:
    out_h, out_w = grid_h // scale, grid_w // scale
    rows = src.numel() // (channels * scale * scale)
    if rows == 0:
        return
    block_c = min(triton.next_power_of_2(channels), _MAX_BLOCK_C)
    grid = (rows * scale * scale, triton.cdiv(channels, block_c))
    _pixel_shuffle_kernel[grid](src, dst, grid_h, grid_w, out_w, out_h * out_w, channels,
                                SCALE=scale, BLOCK_C=block_c, INVERSE=inverse, num_warps=4)


@torch.library.custom_op("nvlm_triton::pixel_shuffle", mutates_args=())
def _pixel_shuffle_op(x: torch.Tensor, scale: int, grid_h: int, grid_w: int) -> torch.Tensor:
    x = x.contiguous()
    n, _, channels = x.shape
    tokens = (grid_h // scale) * (grid_w // scale)
    out = new_output((n, tokens, channels * scale * scale), dtype=x.dtype, device=x.device)
    _launch(x, out, channels, scale, grid_h, grid_w, inverse=False)
    return out


@torch.library.custom_op("nvlm_triton::pixel_unshuffle", mutates_args=())
def _pixel_unshuffle_op(grad_out: torch.Tensor, channels: int, scale: int, grid_h: int,
                        grid_w: int) -> torch.Tensor:
    grad_out = grad_out.contiguous()
    grad_x = new_output((grad_out.shape[0], grid_h * grid_w, channels), dtype=grad_out.dtype,
                        device=grad_out.device)
    _launch(grad_out, grad_x, channels, scale, grid_h, grid_w, inverse=True)
    return grad_x


register_pixel_shuffle(_pixel_shuffle_op, _pixel_unshuffle_op)


def pixel_shuffle(x: torch.Tensor, scale: int = 2,
                  grid: tuple[int, int] | None = None) -> torch.Tensor:
    """The triton backend of nvlm_kernels.pixel_shuffle (inputs already validated)."""
    grid_h, grid_w = grid
    return _pixel_shuffle_op(x, scale, grid_h, grid_w)
