"""Backend selection: which implementation runs each op.

Backends: `torch` (reference.py, always there), `triton` (nvlm_kernels/ops, GPU, or the CPU under
TRITON_INTERPRET=1), `native` (the compiled nvlm_kernels._C ops). The choice comes from the
innermost `use_backend(...)` block, else the NVLM_KERNELS_BACKEND environment variable, else
"auto": for CUDA tensors triton, then native, then torch; for CPU tensors native, then torch
(the Triton interpreter is a testing tool, never picked automatically). A backend named
explicitly is strict: if it cannot run an op for the given device and dtype, the call raises
instead of silently running something else, so a test that forces a backend really tests it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from . import reference
from ._implementation import OPS, Implementation

BACKEND_NAMES = ("torch", "triton", "native")


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str       # why it is (not) usable
    ops: tuple[str, ...]  # the ops it implements

    def __str__(self) -> str:
        state = "available" if self.available else "unavailable"
        ops = ", ".join(self.ops) if self.ops else "none yet"
        return f"{self.name}: {state} ({self.reason}); ops: {ops}"


def _any_device(device: torch.device, dtype: torch.dtype) -> str | None:
    return None


def _torch_implementations() -> dict[str, Implementation]:
    return {op: Implementation(getattr(reference, op), _any_device) for op in OPS}


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def _load_triton() -> tuple[str | None, dict[str, Implementation]]:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)", {}
    from . import ops  # noqa: PLC0415  (imports triton)

    return None, ops.triton_implementations()


def _load_native() -> tuple[str | None, dict[str, Implementation]]:
    from . import _native  # noqa: PLC0415

    error = _native.load_error()
    return error, ({} if error else _native.implementations())


# backend name -> (why unavailable or None, implementations). A plain dict, filled on first use,
# so that torch.compile reads it like any other global.
_loaded: dict[str, tuple[str | None, dict[str, Implementation]]] = {}
_load_lock = threading.Lock()  # first use from several threads registers each backend once


def _backend(name: str) -> tuple[str | None, dict[str, Implementation]]:
    if name in _loaded:
        return _loaded[name]
    with _load_lock:
        if name in _loaded:
            pass
        elif name == "torch":
            _loaded[name] = (None, _torch_implementations())
        elif name == "triton":
            _loaded[name] = _load_triton()
        elif name == "native":
            _loaded[name] = _load_native()
        else:
            raise ValueError(f"unknown backend {name!r}; choose one of auto, "
                             f"{', '.join(BACKEND_NAMES)}")
        return _loaded[name]


def available_backends() -> dict[str, BackendStatus]:
    """Which backends are usable here, why the others are not, and which ops each implements."""
    statuses = {}
    for name in BACKEND_NAMES:
        error, impls = _backend(name)
        if name == "torch":
            reason = "eager PyTorch reference (nvlm_kernels/reference.py)"
        elif name == "triton" and error is None:
            if torch.cuda.is_available():
                reason = "triton with a CUDA device"
            elif triton_interpreter_enabled():
                reason = "triton interpreter on the CPU (TRITON_INTERPRET=1)"
            else:
                error = "no CUDA device, and TRITON_INTERPRET=1 is not set for the CPU interpreter"
        elif name == "native" and error is None:
            from . import _native  # noqa: PLC0415

            reason = "nvlm_kernels._C " + ("with CUDA kernels" if _native.cuda_built()
                                           else "with CPU kernels only")
        statuses[name] = BackendStatus(name, error is None, error or reason, tuple(sorted(impls)))
    return statuses


# --------------------------------------------------------------------------------------------
# the current choice


_local = threading.local()


def _requested_backend() -> str:
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    name = os.environ.get("NVLM_KERNELS_BACKEND", "auto").strip().lower() or "auto"
    if name != "auto" and name not in BACKEND_NAMES:
        raise ValueError(f"NVLM_KERNELS_BACKEND={name!r} is not a backend; choose one of auto, "
                         f"{', '.join(BACKEND_NAMES)}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops inside the block on backend `name` ("auto", "torch", "triton" or "native").

    The choice is per thread and is made when an op runs forward (its backward uses the same
    backend); threads started inside the block follow NVLM_KERNELS_BACKEND instead.
    """
    if name != "auto" and name not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {name!r}; choose one of auto, {', '.join(BACKEND_NAMES)}")
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def _auto_order(device: torch.device) -> tuple[str, ...]:
    return ("triton", "native", "torch") if device.type == "cuda" else ("native", "torch")


def _triton_device_error(device: torch.device) -> str | None:
    if device.type == "cuda" or (device.type == "cpu" and triton_interpreter_enabled()):
        return None
    return (f"the triton backend runs CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 "
            f"(set before triton is imported); got a {device.type} tensor")


# Under torch.compile the choice is made once, when the function is traced (the backend of a
# compiled function does not change with later use_backend blocks); Dynamo runs this function
# eagerly and keeps its result as a constant instead of tracing the loading code (see the mark
# after the function).
def selected_backend(op: str, device_type: str, dtype: torch.dtype) -> str:
    """The backend that runs `op` for tensors of this device type and dtype (or raises why not).
    Each answer is kept: it is asked once per op call, and only the request (use_backend, the
    environment) can change it once the backends have loaded."""
    requested = _requested_backend()
    key = (requested, op, device_type, dtype,
           requested == "triton" and device_type == "cpu" and triton_interpreter_enabled())
    name = _selected.get(key)
    if name is None:
        name = _selected[key] = _select(requested, op, torch.device(device_type), dtype)
    return name


_selected: dict[tuple, str] = {}


def _select(requested: str, op: str, device: torch.device, dtype: torch.dtype) -> str:
    if requested == "auto":
        for name in _auto_order(device):
            error, impls = _backend(name)
            impl = impls.get(op)
            if error is None and impl is not None and impl.supports(device, dtype) is None:
                return name
        raise AssertionError("the torch backend supports every op")  # pragma: no cover
    error, impls = _backend(requested)
    if error is not None:
        raise RuntimeError(f"backend {requested!r} was requested for {op} but is unavailable: "
                           f"{error}")
    impl = impls.get(op)
    if impl is None:
        have = ", ".join(sorted(impls)) or "none yet"
        raise NotImplementedError(f"backend {requested!r} has no implementation of {op} "
                                  f"(its ops: {have}); use the torch or auto backend")
    why = (_triton_device_error(device) if requested == "triton" else None) or impl.supports(device, dtype)
    if why is not None:
        raise RuntimeError(f"backend {requested!r} cannot run {op} here: {why}")
    return requested


# What torch.compiler.assume_constant_result does, without importing Dynamo (and with it triton,
# about 2 s) when nvlm_kernels is imported; the op tests (tests/test_pixel_shuffle.py, ...) compile
# through it.
selected_backend._dynamo_marked_constant = True  # type: ignore[attr-defined]


def implementation(op: str, tensor: torch.Tensor) -> Callable:
    """The function that runs `op` for inputs on the device and with the dtype of `tensor`."""
    name = selected_backend(op, tensor.device.type, tensor.dtype)
    return _loaded[name][1][op].fn
