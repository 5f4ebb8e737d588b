"""The ops and what a backend provides for one of them: a leaf, so that the backends (ops/,
_native.py) and the selection that loads them (_backends.py) all import it without importing each
other."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

# Every op of the library, by its public name (functional.py). Each backend implements a subset:
# the torch backend (reference.py) all of them, the triton backend all of them (one module per
# op in ops/, of the same name), the native backend those it has kernels for (_native.py).
OPS = ("pixel_shuffle", "pixel_shuffle_layernorm", "multimodal_embed", "varlen_attention",
       "cross_attention")


@dataclass(frozen=True)
class Implementation:
    """One backend's implementation of one op; `supports` returns None or why it cannot run."""

    fn: Callable
    supports: Callable[[torch.device, torch.dtype], str | None]
