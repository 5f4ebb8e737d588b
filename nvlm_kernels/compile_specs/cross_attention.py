"""Compile-gate specs of ops/cross_attention.py: every shipped config x head dim x dtype, gated
(the superset of the ungated programs: a load and a multiply more), for the arch it is meant for."""

from __future__ import annotations

from ..ops._attention_core import shipped_configs
from ..ops.cross_attention import (_SPAN_QUERY_BLOCKS, _cross_bwd_dkdv_kernel,
                                   _cross_bwd_dq_kernel, _cross_fwd_kernel,
                                   _query_block_spans_kernel)
from ._attention import CORE_SPILLS_16BIT, allowed_spills, narrow_dots, typed
from .spec import KernelSpec, gqa_groups, signature

# Spills: none in the 16-bit programs on triton 3.9 (2026-11-27), the gate's version. On triton
# 3.6 (the GPU environment; recorded, not allowances) the sm_90 d = 128 and sm_80 d = 64 dK/dV
# spill 8 bytes. GQA and fp32: the attention core's allowances (_attention.py).
_MEASURED_SPILLS_16BIT: dict[tuple, int] = dict(CORE_SPILLS_16BIT)

_RANGES = {"start_ptr": "*i32", "end_ptr": "*i32", "gate_ptr": "*fp32", "lse_ptr": "*fp32",
           "qk_scale_log2": "fp32"}
_BACKWARD = {**_RANGES, "delta_ptr": "*fp32", "softmax_scale": "fp32"}
_KERNELS = {"fwd": (_cross_fwd_kernel, _RANGES),
            "bwd_dq": (_cross_bwd_dq_kernel, _BACKWARD),
            "bwd_dkdv": (_cross_bwd_dkdv_kernel, {**_BACKWARD, "first_ptr": "*i32",
                                                  "last_ptr": "*i32"})}


def _span_specs() -> list[KernelSpec]:
    """The dK/dV pass's span kernel, for each (BLOCK_M, BLOCK_N) a dK/dV config launches it with."""
    tiles = sorted({(config[0], config[1]) for (_, kind, _, _), _, config in shipped_configs()
                    if kind == "bwd_dkdv"})
    return [KernelSpec(f"cross_attention_spans[m={block_m},n={block_n}]",
                       _query_block_spans_kernel, signature(_query_block_spans_kernel, "i32"),
                       {"BLOCK_M": block_m, "BLOCK_N": block_n,
                        "QUERY_BLOCKS": _SPAN_QUERY_BLOCKS},
                       divisible_by_16=("start_ptr", "end_ptr"))
            for block_m, block_n in tiles]


def specs() -> list[KernelSpec]:
    result = _span_specs()
    for (arch, kind, padded, width), index, config in shipped_configs():
        if kind == "bwd_dkdv_kq":
            continue  # the keys-on-M dK/dV is varlen attention's candidate only, so far
        block_m, block_n, warps, stages = config
        alt = f",alt{index}" if index else ""
        if width == "fp32" and padded < 64:
            continue  # the d = 16/32 fp32 entries repeat the d = 64 one
        dtype = "bf16" if width == "16bit" else "fp32"  # fp16 lowers like bf16
        kernel, types = _KERNELS[kind]
        arguments, aligned = typed(kernel, dtype, **types)
        for group in gqa_groups(arch, width, index, padded):
            gqa = f",gqa{group}" if group > 1 else ""
            constexprs = {"GROUP": group, "GATED": True, "HEAD_DIM": padded, "BLOCK_M": block_m,
                          "BLOCK_N": block_n, "IEEE_DOTS": dtype == "fp32"}
            if kind == "fwd":
                constexprs["SAVE_UNGATED"] = True
            result.append(KernelSpec(
                f"cross_attention_{kind}[{arch},d={padded},{dtype}{alt}{gqa}]", kernel,
                arguments, constexprs, num_warps=warps, num_stages=stages,
                archs=(90 if arch == "sm90" else 80,), expects_wgmma=dtype != "fp32",
                allowed_spill_bytes=allowed_spills(_MEASURED_SPILLS_16BIT, arch, kind, padded,
                                                   dtype, group),
                allowed_non_wgmma_dots=narrow_dots(arch, kind, block_m, width),
                divisible_by_16=aligned))
    return result
