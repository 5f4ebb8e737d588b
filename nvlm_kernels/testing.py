"""Checking a backend against the float64 reference (docs/design.md, "Correctness rule").

`compare_with_reference(op, inputs, backend)` runs an op three ways on the same random inputs:
  1. reference.py in float64 (the truth),
  2. reference.py in the inputs' dtype (how much error that dtype itself forces),
  3. the backend under test, with its outputs poisoned (NaN) before the run,
then backpropagates one random output gradient through all three and measures the forward output
and every input gradient. Errors are relative to the largest magnitude of the float64 result.
Tolerances: float32 1e-5 (attention 1e-4); float16/bfloat16 twice the error of (2) plus one
unit of rounding. Used by the tests, `python -m nvlm_kernels.check` and the GPU check.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from . import functional
from ._backends import use_backend

ATTENTION_OPS = ("varlen_attention", "cross_attention")


@contextlib.contextmanager
def poisoned_outputs() -> Iterator[None]:
    """Inside the block, freshly allocated kernel outputs are filled with NaN (Python and C++)."""
    previous = os.environ.get("NVLM_KERNELS_POISON")
    os.environ["NVLM_KERNELS_POISON"] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["NVLM_KERNELS_POISON"]
        else:
            os.environ["NVLM_KERNELS_POISON"] = previous


def float32_tolerance(op: str) -> float:
    return 1e-4 if op in ATTENTION_OPS else 1e-5


@dataclass
class Measurement:
    name: str          # "out" or "grad <input>"
    error: float       # max |backend - float64| / max |float64|
    tolerance: float
    reference_error: float | None = None  # the reference's own error in the dtype (fp16/bf16)

    @property
    def ok(self) -> bool:
        return self.error <= self.tolerance  # False for NaN


@dataclass
class Comparison:
    op: str
    backend: str
    dtype: torch.dtype
    measurements: list[Measurement] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # wrong dtype, device or shape

    @property
    def ok(self) -> bool:
        return not self.problems and all(m.ok for m in self.measurements)

    @property
    def worst(self) -> Measurement:
        return max(self.measurements, key=lambda m: m.error / m.tolerance
                   if m.error == m.error else float("inf"))

    def describe(self) -> str:
        rows = [f"{self.op} on {self.backend} ({self.dtype}):"] + [f"  {p}" for p in self.problems]
        for m in self.measurements:
            extra = "" if m.reference_error is None else f" (reference in dtype: {m.reference_error:.2e})"
            rows.append(f"  {m.name:<22} error {m.error:.3e}  tolerance {m.tolerance:.3e}{extra}"
                        f"  {'ok' if m.ok else 'FAIL'}")
        return "\n".join(rows)


def _relative_error(actual: torch.Tensor | None, expected: torch.Tensor | None) -> float:
    if expected is None:
        expected = torch.zeros_like(actual, dtype=torch.float64) if actual is not None else None
    if expected is None:
        return 0.0
    if actual is None:
        actual = torch.zeros_like(expected)
    if actual.shape != expected.shape:
        return float("nan")
    if expected.numel() == 0:
        return 0.0
    scale = expected.detach().abs().max().clamp_min(1e-30)
    return float((actual.detach().double() - expected.detach()).abs().max() / scale)


def _cast_inputs(inputs: dict[str, Any], dtype: torch.dtype | None) -> tuple[dict[str, Any], list[str]]:
    """Detached copies; floating tensors cast to `dtype` (if given) and made to require grad."""
    cast, differentiable = {}, []
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().clone()
            if value.is_floating_point():
                if dtype is not None:
                    value = value.to(dtype)
                value.requires_grad_(True)
                differentiable.append(name)
        cast[name] = value
    return cast, differentiable


def _run(op: str, inputs: dict[str, Any], differentiable: list[str], backend: str,
         grad_out: torch.Tensor | None, poison: bool = False,
         function: Callable[..., torch.Tensor] | None = None):
    context = poisoned_outputs() if poison else contextlib.nullcontext()
    with use_backend(backend), context:
        out = (function or getattr(functional, op))(**inputs)
        if grad_out is None:
            return out, {}
        tensors = [inputs[name] for name in differentiable]
        grads = torch.autograd.grad(out, tensors, grad_out.to(out.dtype), allow_unused=True)
    # a sparse gradient (multimodal_embed's sparse_grad) is compared by value
    grads = [g.to_dense() if g is not None and g.is_sparse else g for g in grads]
    return out, dict(zip(differentiable, grads))


# Options that change only the format of a gradient, not its value: the reference runs without
# them, so that its (dense) gradients stay independent of the code under test.
_GRADIENT_FORMAT_OPTIONS = ("sparse_grad",)


def _dense_reference_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in inputs.items() if name not in _GRADIENT_FORMAT_OPTIONS}


def compare_with_reference(op: str, inputs: dict[str, Any], backend: str,
                           check_grads: bool = True, seed: int = 0,
                           function: Callable[..., torch.Tensor] | None = None) -> Comparison:
    """Measure `backend` against reference.py in float64 on `inputs` (kwargs of the public op).

    `function`, if given, is measured instead of the op (with `backend` as its label): an outside
    implementation taking the op's keyword arguments, e.g. flash-attention, whose error on the
    same inputs is the yardstick for a kernel's."""
    sample = next(v for v in inputs.values() if isinstance(v, torch.Tensor) and v.is_floating_point())
    dtype = sample.dtype

    ref_inputs, differentiable = _cast_inputs(_dense_reference_inputs(inputs), torch.float64)
    ref_out, _ = _run(op, ref_inputs, differentiable, "torch", None)
    grad_out = None
    if check_grads and differentiable:
        generator = torch.Generator(device="cpu").manual_seed(seed + 1)
        grad_out = torch.randn(ref_out.shape, generator=generator, dtype=torch.float64)
        grad_out = grad_out.to(ref_out.device)
        ref_out, ref_grads = _run(op, ref_inputs, differentiable, "torch", grad_out)
    else:
        ref_grads = {}

    test_inputs, _ = _cast_inputs(inputs, None)
    out, grads = _run(op, test_inputs, differentiable, "torch" if function else backend, grad_out,
                      poison=function is None, function=function)

    # the reference in the inputs' own dtype: the dtype/device every result must have, and for
    # fp16/bf16 the error that the dtype itself forces
    own_inputs, _ = _cast_inputs(_dense_reference_inputs(inputs), None)
    own_out, own_grads = _run(op, own_inputs, differentiable, "torch", grad_out)
    low_precision = dtype in (torch.float16, torch.bfloat16)
    comparison = Comparison(op, backend, dtype)
    names = ["out"] + [f"grad {name}" for name in ref_grads]
    actual = [out] + [grads[name] for name in ref_grads]
    expected = [ref_out] + [ref_grads[name] for name in ref_grads]
    own = [own_out] + [own_grads[name] for name in ref_grads]
    for name, a, o in zip(names, actual, own):
        if a is not None and o is not None and (a.dtype, a.device) != (o.dtype, o.device):
            comparison.problems.append(f"{name} is {a.dtype} on {a.device}, expected {o.dtype} "
                                       f"on {o.device}")
    for name, a, e, o in zip(names, actual, expected, own):
        error = _relative_error(a, e)
        if dtype == torch.float64:
            tolerance, reference_error = 1e-10, None
        elif low_precision:
            reference_error = _relative_error(o, e)
            tolerance = 2 * reference_error + torch.finfo(dtype).eps
        else:
            tolerance, reference_error = float32_tolerance(op), None
        comparison.measurements.append(Measurement(name, error, tolerance, reference_error))
    return comparison


def assert_matches_reference(op: str, inputs: dict[str, Any], backend: str,
                             check_grads: bool = True, seed: int = 0) -> Comparison:
    comparison = compare_with_reference(op, inputs, backend, check_grads, seed)
    assert comparison.ok, comparison.describe()
    return comparison


# --------------------------------------------------------------------------------------------
# random inputs at small, odd shapes (the tests add their own edge cases)


def _randn(generator, *shape, device, dtype) -> torch.Tensor:
    return torch.randn(*shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)


def sample_inputs(op: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  seed: int = 0) -> dict[str, Any]:
    """A small random case of `op` with odd sizes, as keyword arguments of the public op."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    r = lambda *shape: _randn(g, *shape, device=device, dtype=dtype)  # noqa: E731
    if op == "pixel_shuffle":
        return {"x": r(3, 36, 24), "scale": 2}
    if op == "pixel_shuffle_layernorm":
        return {"x": r(3, 36, 24) * 2 + 0.5, "weight": r(96), "bias": r(96), "eps": 1e-5, "scale": 2}
    if op == "multimodal_embed":
        ids = torch.randint(0, 50, (2, 23), generator=g)
        ids[0, 3:7] = 99
        ids[1, 10:15] = 99
        ids[1, 0] = 0
        ids[1, -1] = 49
        return {"input_ids": ids.to(device), "embed_weight": r(50, 40),
                "image_embeds": r(9, 40), "image_token_id": 99}
    if op == "varlen_attention":
        lengths_q, lengths_k = [1, 7, 0, 40], [3, 7, 5, 33]
        cu_q = torch.tensor([0] + lengths_q, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        cu_k = torch.tensor([0] + lengths_k, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        return {"q": r(sum(lengths_q), 6, 40), "k": r(sum(lengths_k), 2, 40),
                "v": r(sum(lengths_k), 2, 40), "cu_seqlens_q": cu_q.to(device),
                "cu_seqlens_k": cu_k.to(device), "max_seqlen_q": max(lengths_q),
                "max_seqlen_k": max(lengths_k), "causal": True}
    if op == "cross_attention":
        total_q, total_kv = 29, 45
        start = torch.randint(0, total_kv, (total_q,), generator=g)
        end = torch.minimum(start + torch.randint(0, 20, (total_q,), generator=g),
                            torch.tensor(total_kv))
        start[:3] = end[:3]  # empty ranges
        return {"q": r(total_q, 4, 40), "k": r(total_kv, 2, 40), "v": r(total_kv, 2, 40),
                "kv_start": start.to(device=device, dtype=torch.int32),
                "kv_end": end.to(device=device, dtype=torch.int32),
                "gate": r(4) * 0.5 + 0.3}
    raise ValueError(f"unknown op {op!r}")



def interpreter_safe_dtypes(device: str | torch.device) -> list[torch.dtype]:
    """The dtypes a dot kernel's test can check here: fp32 and fp16 everywhere, bf16 on a GPU
    only (the Triton interpreter's tl.dot on bf16 is wrong, docs/design.md)."""
    cuda = torch.device(device).type == "cuda"
    return [torch.float32, torch.float16] + ([torch.bfloat16] if cuda else [])


def backend_unavailable_reason(backend: str, op: str, device: str | torch.device,
                               dtype: torch.dtype) -> str | None:
    """None if `backend` can run `op` for tensors of this device and dtype, else why not."""
    from . import _backends  # noqa: PLC0415

    with use_backend(backend):
        try:
            _backends.selected_backend(op, torch.device(device).type, dtype)
        except (RuntimeError, NotImplementedError) as exc:
            return str(exc)
    return None
