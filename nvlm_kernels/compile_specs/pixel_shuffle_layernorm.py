"""Compile-gate specs of ops/pixel_shuffle_layernorm.py, at the two channel widths NVLM's ViTs
have (C = 3200 padded to 4096: InternViT-6B; C = 1024: InternViT-300M)."""

from __future__ import annotations

from ..ops.pixel_shuffle_layernorm import (_COLUMN_BLOCK, _COLUMN_WARPS, _backward_stages,
                                           _backward_warps, _forward_max_registers, _num_warps,
                                           _psln_bwd_kernel, _psln_fwd_kernel,
                                           _sum_partials_kernel)
from .spec import KernelSpec, signature

_STATISTICS = {"mean_ptr": "*fp32", "rstd_ptr": "*fp32"}
_PARTIALS = {"partial_weight_ptr": "*fp32", "partial_bias_ptr": "*fp32"}


def _row_specs(dtype: str, channels_pow2: int) -> list[KernelSpec]:
    tile = {"SCALE": 2, "PARTS": 4, "BLOCK_C": channels_pow2}
    warps = _num_warps(4 * channels_pow2)
    backward_warps = _backward_warps(4 * channels_pow2)
    stages = _backward_stages(channels_pow2, 4 if dtype == "fp32" else 2, backward_warps)
    label = f"{dtype},C<={channels_pow2}"
    return [
        KernelSpec(f"pixel_shuffle_layernorm_fwd[{label}]", _psln_fwd_kernel,
                   signature(_psln_fwd_kernel, dtype, **_STATISTICS, eps="fp32"), tile,
                   num_warps=warps, maxnreg=_forward_max_registers(warps),
                   divisible_by_16=("x_ptr", "weight_ptr", "bias_ptr", "out_ptr", "channels"),
                   expects_16_byte_access=True),
        KernelSpec(f"pixel_shuffle_layernorm_bwd[{label}]", _psln_bwd_kernel,
                   signature(_psln_bwd_kernel, dtype, **_STATISTICS, **_PARTIALS),
                   {**tile, "STAGES": stages}, num_warps=backward_warps,
                   divisible_by_16=("grad_ptr", "x_ptr", "weight_ptr", "grad_x_ptr",
                                    *_PARTIALS, "channels"),
                   expects_16_byte_access=True),
    ]


def _sum_partials_spec(dtype: str) -> KernelSpec:
    return KernelSpec(
        f"pixel_shuffle_layernorm_sum_partials[{dtype}]", _sum_partials_kernel,
        signature(_sum_partials_kernel, dtype, **_PARTIALS), {"BLOCK": _COLUMN_BLOCK},
        num_warps=_COLUMN_WARPS,
        divisible_by_16=(*_PARTIALS, "grad_weight_ptr", "grad_bias_ptr", "width"),
        expects_16_byte_access=True)


def specs() -> list[KernelSpec]:
    dtypes = ("bf16", "fp16", "fp32")
    return ([spec for dtype in dtypes for c in (4096, 1024) for spec in _row_specs(dtype, c)]
            + [_sum_partials_spec(dtype) for dtype in dtypes])
