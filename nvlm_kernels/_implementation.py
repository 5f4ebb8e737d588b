"""What a backend provides for one op: a leaf, so that the backends (ops/, _native.py) and the
selection that loads them (_backends.py) all import it without importing each other."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Implementation:
    """One backend's implementation of one op; `supports` returns None or why it cannot run."""

    fn: Callable
    supports: Callable[[torch.device, torch.dtype], str | None]
