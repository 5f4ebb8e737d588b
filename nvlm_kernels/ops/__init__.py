"""The Triton kernels: one module per op (`ops/<op>.py`: @triton.jit kernels -> launcher ->
autograd wrapper). Importing this package imports triton.

An op module joins the `triton` backend by being listed in TRITON_OPS, and joins the compile gate
(nvlm_kernels/compile_gate.py) by exposing COMPILE_SPECS, a list of KernelSpec for every kernel x
shipped config x key specialization; the module names go in KERNEL_MODULES.
"""

from __future__ import annotations

import importlib

import torch

from .._implementation import Implementation
from .._validate import KERNEL_DTYPES


# op name -> (module in this package, function, dtypes its kernels accept)
TRITON_OPS: dict[str, tuple[str, str, tuple[torch.dtype, ...]]] = {
    "pixel_shuffle": ("pixel_shuffle", "pixel_shuffle", KERNEL_DTYPES),
    "pixel_shuffle_layernorm": ("pixel_shuffle_layernorm", "pixel_shuffle_layernorm",
                                KERNEL_DTYPES),
    "multimodal_embed": ("multimodal_embed", "multimodal_embed", KERNEL_DTYPES),
    "varlen_attention": ("varlen_attention", "varlen_attention", KERNEL_DTYPES),
    "cross_attention": ("cross_attention", "cross_attention", KERNEL_DTYPES),
}

# modules whose COMPILE_SPECS the compile gate builds for sm_80 and sm_90
KERNEL_MODULES: tuple[str, ...] = ("pixel_shuffle", "pixel_shuffle_layernorm",
                                   "multimodal_embed", "varlen_attention",
                                   "cross_attention")


def _dtype_check(dtypes: tuple[torch.dtype, ...]):
    def supports(device: torch.device, dtype: torch.dtype) -> str | None:
        return None if dtype in dtypes else f"dtype {dtype} is not one of {dtypes}"

    return supports


def triton_implementations() -> dict[str, Implementation]:
    implementations = {}
    for op, (module, function, dtypes) in TRITON_OPS.items():
        fn = getattr(importlib.import_module(f"{__name__}.{module}"), function)
        implementations[op] = Implementation(fn, _dtype_check(dtypes))
    return implementations


def compile_specs() -> list:
    specs = []
    for module in KERNEL_MODULES:
        specs.extend(importlib.import_module(f"{__name__}.{module}").COMPILE_SPECS)
    return specs
