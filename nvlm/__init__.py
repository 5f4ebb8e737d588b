"""nvlm: the NVLM-D/X/H model family, image processing, checkpoints, generation and the trainer.

    from nvlm import NVLM, NVLMConfig, NVLMProcessor, chat, load_tokenizer

Those names are loaded on first use, so `import nvlm` (and `import nvlm.processing`) stays light.
Built on the public ops of nvlm_kernels (dependency direction: nvlm -> nvlm_kernels -> torch);
the layers inside nvlm are listed in docs/design.md and checked by tests/test_layers.py.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {"NVLM": "nvlm.model", "NVLMConfig": "nvlm.config", "NVLMProcessor": "nvlm.processing",
           "chat": "nvlm.generate", "load_tokenizer": "nvlm.tokenizer"}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'nvlm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
