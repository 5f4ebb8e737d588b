"""What the compile gate (nvlm_kernels/compile_gate.py) builds: a KernelSpec for every shipped
Triton kernel x config x key specialization, one module per op module of nvlm_kernels/ops.

The op modules know nothing of the gate. The specs are built when the gate asks for them, from
the kernels themselves: argument names and order come from each kernel's parameters
(spec.signature), so a spec states only what Triton cannot know (which pointers are fp32, which
arguments are 16-aligned, the measured allowances).
"""

from __future__ import annotations

from .spec import KernelSpec


def shipped_specs() -> list[KernelSpec]:
    """Every shipped kernel's specs (imports triton and the kernels)."""
    from . import (cross_attention, multimodal_embed, pixel_shuffle,  # noqa: PLC0415
                   pixel_shuffle_layernorm, varlen_attention)

    return [*pixel_shuffle.specs(), *pixel_shuffle_layernorm.specs(), *multimodal_embed.specs(),
            *varlen_attention.specs(), *cross_attention.specs()]
