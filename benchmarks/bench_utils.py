"""Shared helpers of the pytest benchmarks: each backend of an op against eager PyTorch at NVLM's
real shapes (benchmarks/cases.py), timed in the same run (pytest-benchmark). `extra_info` records
the bytes an ideal fused kernel moves (or the FLOPs of useful work) for turning times into GB/s
or TFLOP/s. Run: pytest benchmarks  (add --benchmark-disable for a one-round smoke run). These
rows are wall-clock around a synchronize; the one-shot GPU check (gpu_check.py) times the same
cases with CUDA graphs and is what the README quotes.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

import nvlm_kernels as nk
from cases import memory_cases
from nvlm_kernels.ops._attention_core import device_arch, forced_tiles
from nvlm_kernels.ops.varlen_attention import BACKWARD_VARIANTS

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
IMPLEMENTATIONS = ["eager", "native", "triton"]


def bench_dtype(device: str) -> torch.dtype:
    """Training precision: bf16 on the GPU; fp32 on the CPU (the CPU trainer runs fp32)."""
    return torch.bfloat16 if device == "cuda" else torch.float32


def require_implementation(impl: str, op: str, device: str) -> None:
    """Skip unless `impl` is eager or a backend that runs `op` here (no Triton interpreter: it
    would time Python, not a kernel)."""
    if impl == "eager":
        return
    if impl == "triton" and device == "cpu":
        pytest.skip("triton runs on the CPU only under the interpreter; nothing to time")
    from nvlm_kernels.testing import backend_unavailable_reason

    reason = backend_unavailable_reason(impl, op, device, bench_dtype(device))
    if reason:
        pytest.skip(reason)


def bench_memory_op(benchmark, op: str, impl: str, device: str, mode: str, case_index: int = 0):
    """Time one memory-bound op (cases.memory_cases, NVLM's shapes; the op's case_index-th case)
    on `impl` ("eager" or a backend) in `mode` ("forward" or "forward+backward"); returns
    (result, inputs)."""
    require_implementation(impl, op, device)
    case = [c for c in memory_cases("real", device) if c.op == op][case_index]
    dtype = bench_dtype(device)
    args = case.inputs(device, dtype, mode != "forward")
    fn = case.eager if impl == "eager" else on_backend(impl, case.kernel)
    record(benchmark, op=op, mode=mode, impl=impl, device=device, shape=case.shape,
           nbytes=case.bytes(dtype)[mode])
    if mode == "forward":
        return benchmark(synchronized(lambda: fn(*args), device)), args
    wrt = [args[i] for i in case.grad_inputs]
    grad = torch.randn_like(fn(*args))
    return benchmark(synchronized(lambda: torch.autograd.grad(fn(*args), wrt, grad), device)), args


def on_backend(name: str, fn):
    """fn run inside use_backend(name)."""
    def run(*args, **kwargs):
        with nk.use_backend(name):
            return fn(*args, **kwargs)

    return run


def synchronized(fn, device: str):
    """fn followed by a device sync, so that the timer sees the kernels finish."""
    if device != "cuda":
        return fn

    def run():
        result = fn()
        torch.cuda.synchronize()
        return result

    return run


def triton_mode(impl: str) -> contextlib.ExitStack:
    """The settings of a Triton row, for the forward and the backward alike (enter it around
    the whole step: autograd runs the backward outside the forward's call): "triton_tuned"
    tunes the configs, "triton_atomic_dq" adds dQ with atomics, "triton_kq" runs the keys-on-M
    dK/dV pass, "triton_split_group" one dK/dV program per query head under GQA,
    "triton_kq_split_group" both (varlen attention), "triton_tiles<N>" forces the tuner's N-th
    alternative tiles on every attention launch; "triton" is the shipped form."""
    stack = contextlib.ExitStack()
    if impl == "triton_tuned":
        stack.enter_context(nk.autotuning())
    for variable in TRITON_VARIANTS.get(impl, ()):
        stack.enter_context(environment(variable, "1"))
    if impl in TILE_OPTIONS:
        arch = device_arch(torch.device("cuda")) if torch.cuda.is_available() else "sm90"
        stack.enter_context(forced_tiles(arch, TILE_OPTIONS[impl]))
    return stack


# Backward variants selected by environment variables (read at each launch), by row name.
TRITON_VARIANTS = {f"triton_{name}": switches for name, switches in BACKWARD_VARIANTS.items()}
# The tuner's alternative tiles (ops/_attention_core.ALTERNATIVES; at most two per kernel),
# forced on every attention launch: the GPU check's correctness rows, since the tuner may pick
# them and its own stage only times them.
TILE_OPTIONS = {"triton_tiles1": 1, "triton_tiles2": 2}


@contextlib.contextmanager
def environment(name: str, value: str):
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            del os.environ[name]
        else:
            os.environ[name] = previous


def tune_before_timing(benchmark, impl: str, fn) -> None:
    """For impl "triton_tuned": run fn once untimed, so that the tuner measures its candidates
    before the timer starts, and record its picks for this row's op in the row's extra_info
    (keys name the kernel, arch, head dim, dtype and causal/gated)."""
    if impl != "triton_tuned":
        return
    fn()
    torch.cuda.synchronize()
    op = benchmark.extra_info["op"]  # record() ran first
    benchmark.extra_info["configs"] = {key: config for key, config in nk.tuned_configs().items()
                                       if key.startswith(op + "/")}


def record(benchmark, *, op: str, mode: str, impl: str, device: str, shape: str,
           nbytes: int) -> None:
    """nbytes: what an ideal fused kernel reads and writes in this mode."""
    benchmark.group = f"{op} {mode} {device}"
    benchmark.extra_info.update(op=op, mode=mode, impl=impl, device=device,
                                dtype=str(bench_dtype(device)), shape=shape, bytes=nbytes)
