"""The build switches of setup.py behave as documented."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def build_ext(tmp_path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--build-temp", str(tmp_path / "temp"),
         "--build-lib", str(tmp_path / "lib")],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, **env}, timeout=600)


@pytest.mark.skipif(torch.version.cuda is not None, reason="torch has CUDA here")
def test_force_cuda_with_cpu_torch_explains_what_is_needed(tmp_path):
    result = build_ext(tmp_path, NVLM_KERNELS_FORCE_CUDA="1")
    assert result.returncode != 0
    assert "needs a CUDA build of torch" in result.stderr
    assert "tests/test_compile_gate.py" in result.stderr  # points to the static check instead


def test_skip_native_builds_no_extension(tmp_path):
    result = build_ext(tmp_path, NVLM_KERNELS_SKIP_NATIVE="1")
    assert result.returncode == 0, result.stderr
    assert not list((tmp_path / "lib").rglob("_C*.so"))


def test_installed_extension_reports_how_it_was_built():
    import nvlm_kernels as nk

    status = nk.available_backends()["native"]
    if not status.available:
        pytest.skip(status.reason)
    from nvlm_kernels import _C

    # CPU torch can only have built the CPU kernels
    assert _C.cuda_built is False or torch.version.cuda is not None
    assert ("with CUDA kernels" in status.reason) == _C.cuda_built
