"""Shared helpers of the benchmarks. Benchmarks: each backend of an op against eager PyTorch at NVLM's real shapes, timed in the
same run (pytest-benchmark). `extra_info` records the bytes an ideal fused kernel moves (or the
FLOPs of useful work), so benchmarks/report.py can turn times into GB/s, % of the measured
ceiling and speed-up vs eager. Run: pytest benchmarks  (add --benchmark-disable for a smoke run).
"""

from __future__ import annotations

import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def bench_dtype(device: str) -> torch.dtype:
    """Training precision: bf16 on the GPU; fp32 on the CPU (the CPU trainer runs fp32)."""
    return torch.bfloat16 if device == "cuda" else torch.float32


def synchronized(fn, device: str):
    """fn followed by a device sync, so that the timer sees the kernels finish."""
    if device != "cuda":
        return fn

    def run():
        result = fn()
        torch.cuda.synchronize()
        return result

    return run
