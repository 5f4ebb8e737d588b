"""Compile-gate specs of ops/varlen_attention.py: every shipped config x head dim x causal x dtype,
for the arch it is meant for, with the GQA specializations the decoders launch."""

from __future__ import annotations

from ..ops._attention_core import shipped_configs
from ..ops.varlen_attention import _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel, _attn_fwd_kernel
from ._attention import CORE_SPILLS_16BIT, allowed_spills, delta_specs, narrow_dots, typed
from .spec import KernelSpec, gqa_groups

# Spills the compile gate measured (cuobjdump STACK bytes, 2026-11-27) and accepts. The gate runs
# with the CPU machines' triton (3.9); the triton 3.6 figures below are recorded for the GPU run
# and are not allowances (the gate fails those entries under 3.6):
# - 16-bit: the sm_90 d = 256 dK/dV program at the register limit, 8 bytes (triton 3.9; 0 on
#   3.6). On triton 3.6 (the GPU environment) the shipped sm_90 d = 128 dK/dV spills 8 bytes
#   (full) and 16 (causal), 0 on 3.9; its spill-free alternative (32, 64, 8, 2) is in the tuner's
#   set, for a GPU run to decide between them. With ATOMIC_DQ the 3.6 figure is 32 bytes (the
#   alternative: 0).
# - 16-bit GQA and fp32: the attention core's allowances (_attention.CORE_SPILLS_16BIT,
#   SPILLS_FP32). The GPU run times the GQA d = 128 dK/dV program against the (32, 64, 8, 2)
#   candidate (161 registers, no spills, two dots on mma.sync).
_MEASURED_SPILLS_16BIT = {("sm90", "bwd_dkdv", 256): 8, **CORE_SPILLS_16BIT}

_OFFSETS = {"cu_q_ptr": "*i32", "cu_k_ptr": "*i32", "qk_scale_log2": "fp32"}
_BACKWARD = {**_OFFSETS, "lse_ptr": "*fp32", "delta_ptr": "*fp32", "softmax_scale": "fp32"}


def specs() -> list[KernelSpec]:
    result = delta_specs()
    for (arch, kind, padded, width), index, config in shipped_configs():
        block_m, block_n, warps, stages = config
        alt = f",alt{index}" if index else ""
        if width == "fp32" and padded < 64:
            continue  # the d = 16/32 fp32 entries repeat the d = 64 one
        dtype = "bf16" if width == "16bit" else "fp32"  # fp16 lowers like bf16
        arch_number = 90 if arch == "sm90" else 80
        # GQA specializations (GROUP > 1) of the causal programs, as the decoders launch them
        programs = [(False, 1)] + [(True, group) for group in
                                   gqa_groups(arch, width, index, padded)]
        for causal, group in programs:
            gqa = f",gqa{group}" if group > 1 else ""
            name = (f"varlen_attention_{kind}[{arch},d={padded},"
                    f"{'causal' if causal else 'full'},{dtype}{alt}{gqa}")
            constexprs = {"GROUP": group, "CAUSAL": causal, "HEAD_DIM": padded, "BLOCK_M": block_m,
                          "BLOCK_N": block_n, "IEEE_DOTS": dtype == "fp32"}
            if kind == "fwd":
                kernel = _attn_fwd_kernel
                variants = [("", constexprs, typed(kernel, dtype, **_OFFSETS, lse_ptr="*fp32"))]
            elif kind == "bwd_dq":
                kernel = _attn_bwd_dq_kernel
                variants = [("", constexprs, typed(kernel, dtype, **_BACKWARD))]
            else:   # bwd_dkdv, bwd_dkdv_kq: one kernel, KEYS_ON_M picks the orientation
                kernel = _attn_bwd_dkdv_kernel
                variants = _dkdv_variants(kernel, dtype, constexprs, width, padded, group,
                                          keys_on_m=kind == "bwd_dkdv_kq")
            for suffix, values, (arguments, aligned) in variants:
                result.append(KernelSpec(
                    f"{name}{suffix}]", kernel, arguments, values, num_warps=warps,
                    num_stages=stages, archs=(arch_number,), expects_wgmma=dtype != "fp32",
                    allowed_spill_bytes=allowed_spills(_MEASURED_SPILLS_16BIT, arch,
                                                       kind + suffix, padded, dtype, group),
                    allowed_non_wgmma_dots=narrow_dots(arch, kind, block_m, width,
                                                       atomic_dq=suffix == ",atomic_dq"),
                    divisible_by_16=aligned))
    return result


def _dkdv_variants(kernel, dtype: str, constexprs: dict, width: str, padded: int, group: int,
                   keys_on_m: bool) -> list[tuple[str, dict, tuple[dict, tuple]]]:
    """(name suffix, constexprs, typed arguments) of the dK/dV programs of one config: the
    default; with atomic dQ (16-bit, d = 64/128, no GQA); and, for each GQA group, the
    split-group form, whose dK/dV are fp32 shares per query head."""
    def arguments(shares: str) -> tuple[dict, tuple]:
        arguments, aligned = typed(kernel, dtype, **_BACKWARD, dq_acc_ptr="*fp32",
                                   **({"dk_ptr": shares, "dv_ptr": shares} if shares else {}))
        return arguments, aligned + ("dq_acc_ptr",) + (("dk_ptr", "dv_ptr") if shares else ())

    flags = {**constexprs, "ATOMIC_DQ": False, "KEYS_ON_M": keys_on_m, "SPLIT_GROUP": False}
    variants = [("", flags, arguments(""))]
    if width == "16bit" and padded in (64, 128) and group == 1:  # opt-in atomic dQ
        variants.append((",atomic_dq", {**flags, "ATOMIC_DQ": True}, arguments("")))
    if group > 1:   # opt-in NVLM_KERNELS_SPLIT_GROUP
        variants.append((",split", {**flags, "SPLIT_GROUP": True}, arguments("*fp32")))
    return variants
