"""The Triton kernels: one module per op (`ops/<op>.py`: @triton.jit kernels -> launcher ->
autograd wrapper). Importing this package imports triton.

Every op of nvlm_kernels (_implementation.OPS) has its module here, of the same name, with a
function of that name: the `triton` backend. What the compile gate builds of each is described
apart, in nvlm_kernels/compile_specs/<op>.py; these modules do not know the gate.
"""

from __future__ import annotations

import importlib

import torch

from .._implementation import OPS, Implementation
from .._validate import KERNEL_DTYPES


def _kernel_dtypes(device: torch.device, dtype: torch.dtype) -> str | None:
    return None if dtype in KERNEL_DTYPES else f"dtype {dtype} is not one of {KERNEL_DTYPES}"


def triton_implementations() -> dict[str, Implementation]:
    """The triton backend: every op, from the module of the same name in this package."""
    return {op: Implementation(getattr(importlib.import_module(f"{__name__}.{op}"), op),
                               _kernel_dtypes) for op in OPS}
