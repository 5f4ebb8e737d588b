"""Compile-gate specs of ops/pixel_shuffle.py: the copy kernel, forward and inverse, per dtype."""

from __future__ import annotations

from ..ops.pixel_shuffle import _MAX_BLOCK_C, _pixel_shuffle_kernel
from .spec import KernelSpec, signature


def specs() -> list[KernelSpec]:
    return [KernelSpec(f"pixel_shuffle[{dtype},{'bwd' if inverse else 'fwd'}]",
                       _pixel_shuffle_kernel, signature(_pixel_shuffle_kernel, dtype),
                       {"SCALE": 2, "BLOCK_C": _MAX_BLOCK_C, "INVERSE": inverse}, num_warps=4,
                       divisible_by_16=("src_ptr", "dst_ptr", "channels"),
                       expects_16_byte_access=True)
            for dtype in ("bf16", "fp16", "fp32") for inverse in (False, True)]
