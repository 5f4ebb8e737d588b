"""Measure the card's ceilings that the benchmarks are judged against: copy bandwidth (a
device-to-device copy, read + write counted) and the dense matmul rate (bf16 on GPU, fp32 on CPU).

    python benchmarks/ceilings.py [--device cuda] [--out ceilings.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def _time(fn, device: str, repeats: int) -> float:
    """Median seconds of fn over `repeats` runs after a warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def copy_bandwidth_gbs(device: str) -> float:
    nbytes = (1 << 30) if device == "cuda" else (1 << 28)  # 1 GiB on GPU: far beyond L2
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    seconds = _time(lambda: dst.copy_(src), device, repeats=20 if device == "cuda" else 5)
    return 2 * nbytes / seconds / 1e9


def matmul_tflops(device: str) -> tuple[float, str]:
    n, dtype = (8192, torch.bfloat16) if device == "cuda" else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = _time(lambda: a @ b, device, repeats=20 if device == "cuda" else 5)
    return 2 * n**3 / seconds / 1e12, str(dtype).replace("torch.", "")


def measure(device: str) -> dict:
    tflops, dtype = matmul_tflops(device)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    return {"device": device, "device_name": name, "copy_gbs": copy_bandwidth_gbs(device),
            "matmul_tflops": tflops, "matmul_dtype": dtype}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out")
    args = parser.parse_args()
    result = measure(args.device)
    print(f"{result['device_name']}: copy {result['copy_gbs']:.0f} GB/s, "
          f"{result['matmul_dtype']} matmul {result['matmul_tflops']:.1f} TFLOP/s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
