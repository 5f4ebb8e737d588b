"""The Triton kernels: one module per op (`ops/<op>.py`: @triton.jit kernels -> launcher ->
autograd wrapper). Importing this package imports triton.

An op module joins the `triton` backend by being listed in TRITON_OPS, and joins the compile gate
(nvlm_kernels/compile_gate.py) by exposing COMPILE_SPECS, a list of KernelSpec for every kernel x
shipped config x key specialization; the module names go in KERNEL_MODULES.
"""

from __future__ import annotations

import importlib

import torch

from .._backends import Implementation, import_attr

# op name -> ("nvlm_kernels.ops.<module>:<function>", dtypes the kernels accept)
TRITON_OPS: dict[str, tuple[str, tuple[torch.dtype, ...]]] = {}

# modules whose COMPILE_SPECS the compile gate builds for sm_80 and sm_90
KERNEL_MODULES: tuple[str, ...] = ()


def _lazy(path: str):
    def call(*args, **kwargs):
        return import_attr(path)(*args, **kwargs)

    return call


def triton_implementations() -> dict[str, Implementation]:
    implementations = {}
    for op, (path, dtypes) in TRITON_OPS.items():
        def supports(device, dtype, dtypes=dtypes):
            return None if dtype in dtypes else f"dtype {dtype} is not one of {dtypes}"

        implementations[op] = Implementation(_lazy(path), supports)
    return implementations


def compile_specs() -> list:
    specs = []
    for module in KERNEL_MODULES:
        specs.extend(importlib.import_module(f"{__name__}.{module}").COMPILE_SPECS)
    return specs
