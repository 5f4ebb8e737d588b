"""KernelSpec, one compiled variant of a Triton kernel as the compile gate builds it, and what the
per-op spec modules share. A leaf module: it imports neither triton nor the kernels, so the gate's
vocabulary costs nothing to import."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

ARCHS = (80, 90)

# Query heads per KV head in the models' decoders and X-attn layers (Qwen2-0.5B 14/2 = 7,
# NVLM-D-72B 64/8 = 8, ...).
GQA_GROUPS = (2, 4, 7, 8)


def gqa_groups(arch: str, width: str, index: int, padded: int) -> tuple[int, ...]:
    """The GROUP values to compile for one attention config: 1 always, and GQA_GROUPS for the
    shipped (first) sm_90 16-bit configs at head dims 64 and 128. GROUP changes only a head
    loop's trip count and a division, so the shipped tiles of the one arch that runs these
    models prove that the specializations build, without multiplying the gate's compiles."""
    if arch == "sm90" and width == "16bit" and index == 0 and padded in (64, 128):
        return (1,) + GQA_GROUPS
    return (1,)


@dataclass(frozen=True)
class KernelSpec:
    """One compiled variant of a Triton kernel, as it ships (one autotune config, one key)."""

    name: str                    # unique, e.g. "varlen_attention_fwd[d=128,causal,bf16,cfg0]"
    kernel: Any                  # the @triton.jit function
    signature: dict[str, str]    # every argument in order: "*bf16", "i32", "fp32", or "constexpr"
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 2
    maxnreg: int | None = None   # a register cap the launch passes (triton's `maxnreg`)
    archs: tuple[int, ...] = ARCHS
    expects_wgmma: bool = False  # attention dots must lower to wgmma on sm_90, every one
    # dots that may stay mma.sync on sm_90 (M < 64 per warpgroup); nonzero only with a comment
    allowed_non_wgmma_dots: int = 0
    allowed_spill_bytes: int = 0  # nonzero only with a comment at the spec giving the measurement
    # Arguments that the launch specializes as multiples of 16 in the common case (16-byte
    # aligned pointers, sizes such as C = 3200): compiled with that hint, as triton's JIT would.
    divisible_by_16: tuple[str, ...] = ()
    expects_16_byte_access: bool = False  # global loads and stores must be 128-bit vectors


def signature(kernel: Any, tensors: str, **types: str) -> dict[str, str]:
    """The argument types of `kernel`, in its parameter order, read from the kernel itself:
    constexpr parameters are "constexpr", `*_ptr` parameters point at the op's tensors
    (`tensors`: "bf16" gives "*bf16"), the others are "i32". `types` names the exceptions
    (fp32 statistics and index pointers, fp32 scalars, i64 sizes); naming a parameter the kernel
    does not have, or a constexpr, is an error, so a renamed argument cannot go stale here."""
    parameters = _parameters(kernel)
    constexprs = {name for name, is_constexpr in parameters if is_constexpr}
    wrong = sorted((set(types) - {name for name, _ in parameters}) | (set(types) & constexprs))
    if wrong:
        raise ValueError(f"{_name(kernel)} has no runtime parameter named {wrong}")
    return {name: "constexpr" if name in constexprs else
            types.get(name, f"*{tensors}" if name.endswith("_ptr") else "i32")
            for name, _ in parameters}


def _parameters(kernel: Any) -> list[tuple[str, bool]]:
    """(name, is constexpr) per parameter: triton's JITFunction.params, or, for the interpreter's
    InterpretedFunction (TRITON_INTERPRET=1), the annotations of the Python function it wraps."""
    params = getattr(kernel, "params", None)
    if params is not None:
        return [(p.name, p.is_constexpr) for p in params]
    function = inspect.signature(kernel.fn)
    return [(name, "constexpr" in str(p.annotation)) for name, p in function.parameters.items()]


def _name(kernel: Any) -> str:
    return getattr(getattr(kernel, "fn", kernel), "__name__", repr(kernel))
