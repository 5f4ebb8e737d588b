"""Opt-in measurement of a kernel's candidate configurations.

Each attention kernel ships one configuration per (arch, kernel, head dim, operand width), the
first of its candidates (ops/_attention_core.py: CONFIGS); a few keys list alternatives
(ALTERNATIVES there), all built by the compile gate. With `NVLM_KERNELS_AUTOTUNE=1`, or inside
`with autotuning():`, the first launch of each key times every candidate on the real inputs and
keeps the fastest for the rest of the process. The key is the kernel, head dim, causal or gated,
and dtype, never the total length, so a new pack never re-tunes. `tuned_configs()` says what was
picked, for the benchmarks to record. Off by default: tuning compiles every candidate (seconds
per key), and the table's entries are meant to be the winners of a measured run.

The kernels write their outputs without accumulating into them, so running a launch several
times while timing leaves the same result. During CUDA graph capture nothing is timed.
"""

from __future__ import annotations

import contextlib
import os
import statistics
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import torch

Config = TypeVar("Config")

_CHOSEN: dict[tuple, object] = {}
# Process-wide, not per thread: autograd runs a CUDA backward on its own device thread, which
# must see the setting of the thread that called backward().
_ENABLED = [False]


def autotune_enabled() -> bool:
    return _ENABLED[0] or os.environ.get("NVLM_KERNELS_AUTOTUNE") == "1"


@contextlib.contextmanager
def autotuning(enabled: bool = True) -> Iterator[None]:
    """Tune (or not) the kernels launched in this block, forward and backward (process-wide)."""
    previous = _ENABLED[0]
    _ENABLED[0] = enabled
    try:
        yield
    finally:
        _ENABLED[0] = previous


def tuned_configs() -> dict[str, object]:
    """The configuration picked for each tuned key so far, as {"key": config}."""
    return {"/".join(map(str, key)): config for key, config in _CHOSEN.items()}


def cuda_time(launch: Callable[[], None], reps: int = 5) -> float:
    """Median milliseconds of `launch` on the current stream, after one untimed launch (the
    compile)."""
    launch()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
    for start, end in events:
        start.record()
        launch()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def pick(key: tuple, candidates: Sequence[Config], launch: Callable[[Config], None],
         timer: Callable[[Callable[[], None]], float] | None = None) -> Config:
    """The configuration to launch `key` with: the first candidate, unless tuning is on, in which
    case the fastest under `timer` (measured once per key and process)."""
    if len(candidates) == 1 or not autotune_enabled():
        return candidates[0]
    if key in _CHOSEN:
        return _CHOSEN[key]
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return candidates[0]
    timer = timer or cuda_time
    times = [timer(lambda config=config: launch(config)) for config in candidates]
    best = candidates[times.index(min(times))]
    _CHOSEN[key] = best
    return best
