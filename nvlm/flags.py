"""Command-line flag types shared by `python -m nvlm`, `python -m nvlm.data` and their commands.

argparse calls a flag type on the flag's text and reports an ArgumentTypeError as
"argument --flag: <message>", then exits with EXIT_USAGE before any work starts.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Callable

from nvlm.images import regular_file_problem

EXIT_USAGE = 2
# torch.Generator.manual_seed takes 64-bit seeds; [0, 2^63) is valid everywhere a seed goes.
SEED_LIMIT = 2**63


def int_flag(low: int, high: int | None = None) -> Callable[[str], int]:
    """An integer in [low, high] (no upper bound when high is None)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"expected an integer {bounds}, got {value}")
        return value
    return parse


def float_flag(low: float, high: float = math.inf,
               low_open: bool = False) -> Callable[[str], float]:
    """A finite number in [low, high], or (low, high] when low_open."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        inside = (value > low if low_open else value >= low) and value <= high
        if not math.isfinite(value) or not inside:
            bounds = (f"{'>' if low_open else '>='} {low:g}" if high == math.inf
                      else f"in {'(' if low_open else '['}{low:g}, {high:g}]")
            raise argparse.ArgumentTypeError(f"expected a finite number {bounds}, got {text!r}")
        return value
    return parse


def seed_flag(text: str) -> int:
    """A random seed in [0, SEED_LIMIT)."""
    return int_flag(0, SEED_LIMIT - 1)(text)


def non_empty_flag(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("expected a non-empty string")
    return text


def existing_dir_flag(text: str) -> Path:
    problem = regular_file_problem(text)
    if problem != "is a directory":
        raise argparse.ArgumentTypeError(f"expected a directory, but {text!r} "
                                         f"{problem or 'is a file'}")
    return Path(text)


def existing_file_flag(text: str) -> Path:
    problem = regular_file_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(f"expected a file, but {text!r} {problem}")
    return Path(text)


def output_file_flag(text: str) -> Path:
    """A file to write: a regular file or nothing yet, in a folder that exists."""
    problem = regular_file_problem(text)
    if problem not in (None, "does not exist"):
        raise argparse.ArgumentTypeError(f"expected a file to write, but {text!r} {problem}")
    if regular_file_problem(os.path.dirname(os.path.abspath(text))) != "is a directory":
        raise argparse.ArgumentTypeError(f"expected a file in an existing folder, but the folder "
                                         f"of {text!r} does not exist")
    return Path(text)


def output_dir_flag(text: str) -> Path:
    """A folder to write into: a directory or nothing yet, whose nearest existing ancestor is a
    directory (the folders in between are created)."""
    path = Path(os.path.abspath(text))
    while (problem := regular_file_problem(path)) == "does not exist" and path != path.parent:
        path = path.parent
    if problem != "is a directory":
        raise argparse.ArgumentTypeError(f"expected a folder, but {str(path)!r} "
                                         f"{problem or 'is a file'}")
    return Path(text)


def device_flag(text: str) -> str:
    """cpu, cuda or cuda:N, where that device exists; auto: cuda if there is one, else cpu."""
    import torch

    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has no CUDA device "
                                             "(torch.cuda.is_available() is False); use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has "
                                             f"{torch.cuda.device_count()} CUDA device(s)")
    return text
