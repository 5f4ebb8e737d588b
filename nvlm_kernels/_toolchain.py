"""Where the CUDA toolchain pieces are: nvcc and the CUTLASS/CuTe headers.

Used by setup.py (loaded by file path, so it must import nothing but the standard library) and by
the compile gate.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def find_nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def cutlass_include_dir() -> str | None:
    """The headers ship inside the `nvidia-cutlass` wheel (module cutlass_library)."""
    try:
        import cutlass_library
    except ImportError:
        return None
    include = Path(cutlass_library.__file__).parent / "source" / "include"
    return str(include) if (include / "cutlass" / "cutlass.h").exists() else None
