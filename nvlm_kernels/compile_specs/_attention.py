"""What the two attention ops' specs share: the delta kernel's specs, the spill and mma.sync
allowances of the attention core, and how an attention kernel's arguments are typed."""

from __future__ import annotations

from typing import Any

from ..ops._attention_core import DELTA_ROWS, delta_kernel
from .spec import KernelSpec, signature

# Spill allowances the compile gate grants both attention ops (their dK/dV pass is the core's):
# - 16-bit GQA (GROUP > 1, first compiled 2026-11-28): the sm_90 d = 128 dK/dV program, whose
#   head loop carries the group's accumulators, reaches 255 registers and spills 64 bytes on
#   triton 3.9 (GROUP = 1: 251-254, none). The 72B decoder (GQA 8) runs it.
# - fp32 (IEEE dots, the exact path for fp32 inputs): the dots lower to FMA loops that spill up
#   to ~10 KB per thread. fp32 attention is for correctness checks, not speed.
CORE_SPILLS_16BIT: dict[tuple, int] = {("sm90", "bwd_dkdv", 128, "gqa"): 64}
SPILLS_FP32 = 10 * 1024 + 512


def allowed_spills(measured_16bit: dict[tuple, int], arch: str, kernel: str, padded: int,
                   dtype: str, group: int = 1) -> int:
    """The spill bytes the gate allows one program: fp32's, else the measured 16-bit entry for
    (arch, kernel, padded head dim[, "gqa" when GROUP > 1]), else none."""
    if dtype == "fp32":
        return SPILLS_FP32
    return measured_16bit.get((arch, kernel, padded) + (("gqa",) if group > 1 else ()), 0)


def narrow_dots(arch: str, kind: str, block_m: int, width: str, atomic_dq: bool = False) -> int:
    """How many of a program's dots stay mma.sync on sm_90, the compile gate's allowance. wgmma
    needs M >= 64 rows per warpgroup; the dK/dV pass computes S = Q K^T and dP = dO V^T (and,
    with atomic dQ, dS K) with M = BLOCK_M rows, so BLOCK_M = 32 (the shipped d = 256 tile and the
    BLOCK_M = 32 tuner candidates) leaves those 2 (3) of its 4 (5) dots on mma.sync, as the gate
    measured on triton 3.9 (2026-11-28). The keys-on-M pass computes the transposed products
    (S^T = K Q^T), with BLOCK_N rows on M."""
    if arch != "sm90" or width != "16bit" or block_m >= 64:
        return 0
    if kind == "bwd_dkdv_kq":   # keys on M everywhere but atomic dQ's dS K
        return 1 if atomic_dq else 0
    return (3 if atomic_dq else 2) if kind == "bwd_dkdv" else 0


def typed(kernel: Any, dtype: str, **types: str) -> tuple[dict[str, str], tuple[str, ...]]:
    """(signature, arguments compiled as multiples of 16) of an attention kernel: the aligned
    ones are its tensor pointers (those not typed apart in `types`), strides and head_dim."""
    arguments = signature(kernel, dtype, **types)
    aligned = tuple(name for name in arguments
                    if (name.endswith("_ptr") and name not in types)
                    or name.startswith("stride_") or name == "head_dim")
    return arguments, aligned


def delta_specs() -> list[KernelSpec]:
    """D = rowsum(O * dO) (and the gate's gradient), shared by both ops' backward."""
    arguments, aligned = typed(delta_kernel, "bf16", delta_ptr="*fp32", gate_grad_ptr="*fp32")
    return [KernelSpec(f"attention_bwd_delta[d={padded},{'gate_grad' if gate_grad else 'plain'}]",
                       delta_kernel, arguments,
                       {"HEAD_DIM": padded, "BLOCK_M": DELTA_ROWS, "GATE_GRAD": gate_grad},
                       divisible_by_16=aligned, expects_16_byte_access=True)
            for padded in (64, 128, 256) for gate_grad in (False, True)]
