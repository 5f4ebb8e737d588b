"""Output allocation for the Python launchers (Triton). With NVLM_KERNELS_POISON=1 (set by the
tests) fresh outputs are filled with NaN, so a kernel that leaves part of its output unwritten
fails the comparison instead of passing on memory that happened to hold the right values. The C++
ops read the same variable (csrc/common.h)."""

from __future__ import annotations

import os

import torch


def poison_enabled() -> bool:
    return os.environ.get("NVLM_KERNELS_POISON", "") == "1"


def new_output(shape, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if poison_enabled() and out.is_floating_point():
        out.fill_(float("nan"))
    return out
