"""GPU time of one call, measured the way docs/gpu.md asks: CUDA-graph replay timed with CUDA events
(the launch gaps of the Python launchers out of the number), inputs rotated over several copies
so that the L2 cache is not what is measured; an event-timed loop of plain calls where a graph
cannot be captured; and, beside it, the host time per call (validation, dispatch, launch), the
part a graph hides. On the CPU (dry runs) a plain perf_counter median.

    result = time_call(fn, input_sets, device)   # fn(*input_sets[i]) for each i
    result.gpu_ms, result.method, result.host_ms, result.stream_ms
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch


@dataclass
class Timing:
    gpu_ms: float          # per call: graph replay (or the event loop where capture failed)
    method: str            # "graph", "events" or "host" (CPU)
    stream_ms: float       # per call, back-to-back plain calls between two events (gaps included)
    host_ms: float         # per call, the host's time to issue it
    sets: int              # input copies rotated over
    replays: int           # timed samples behind the median
    capture_error: str | None = None

    def as_row(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def rotation_count(bytes_per_set: int, device: str, cache_multiple: float = 3.0,
                   most: int = 8) -> int:
    """How many copies of the inputs to rotate over so that together they exceed the L2 cache
    `cache_multiple` times (each call then reads from memory, as in a real step)."""
    if device != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)
    return max(1, min(most, math.ceil(cache_multiple * l2 / max(bytes_per_set, 1))))


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def time_call(fn: Callable, input_sets: Sequence[tuple], device: str, *,
              target_seconds: float = 0.25, warmup: int = 2, use_graph: bool = True) -> Timing:
    """Median time of one `fn(*inputs)` call, rotating over `input_sets`."""
    calls = [lambda inputs=inputs: fn(*inputs) for inputs in input_sets]
    if device != "cuda":
        for call in calls[:warmup]:
            call()
        samples = []
        deadline = time.perf_counter() + target_seconds
        while len(samples) < 3 or (time.perf_counter() < deadline and len(samples) < 50):
            start = time.perf_counter()
            calls[len(samples) % len(calls)]()
            samples.append((time.perf_counter() - start) * 1e3)
        median = _median(samples)
        return Timing(median, "host", median, median, len(calls), len(samples))

    # warm-up on a side stream (compiles, tuner runs, allocator pools), as graph capture wants
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            for call in calls:
                call()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    stream_ms, host_ms, loops = _event_loop(calls, target_seconds / 2)
    gpu_ms, method, replays, error = stream_ms, "events", loops, None
    if use_graph:
        try:
            gpu_ms, replays = _graph_replay(calls, target_seconds / 2)
            method = "graph"
        except Exception as exc:  # noqa: BLE001  (any capture failure falls back to events)
            error = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
            torch.cuda.synchronize()
    return Timing(gpu_ms, method, stream_ms, host_ms, len(calls), replays, error)


def _event_loop(calls: list[Callable], seconds: float) -> tuple[float, float, int]:
    """(GPU ms per call, host ms per call, samples): rounds of one call per input set between two
    events; the median round."""
    gpu, host = [], []
    deadline = time.perf_counter() + seconds
    while len(gpu) < 3 or (time.perf_counter() < deadline and len(gpu) < 100):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        for call in calls:
            call()
        host.append((time.perf_counter() - t0) * 1e3 / len(calls))
        end.record()
        end.synchronize()
        gpu.append(start.elapsed_time(end) / len(calls))
    return _median(gpu), _median(host), len(gpu)


def _graph_replay(calls: list[Callable], seconds: float) -> tuple[float, int]:
    """(GPU ms per call, replays): one graph holding one call per input set, replayed."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    samples = []
    deadline = time.perf_counter() + seconds
    while len(samples) < 5 or (time.perf_counter() < deadline and len(samples) < 200):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / len(calls))
    del graph
    return _median(samples), len(samples)
