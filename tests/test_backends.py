"""Backend control: use_backend, NVLM_KERNELS_BACKEND, auto selection, strict forcing, and a
package that imports and works without its compiled extension, triton or CUDA."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import nvlm_kernels as nk
from nvlm_kernels import _backends, reference
from nvlm_kernels._implementation import OPS
from nvlm_kernels.testing import sample_inputs


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    import os

    environment = {**os.environ, **env}
    for key in [k for k, v in env.items() if v is None]:
        environment.pop(key, None)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=environment, timeout=120)


def test_import_touches_neither_cuda_triton_nor_the_extension():
    result = run_python("""
        import sys, torch
        import nvlm_kernels
        assert "triton" not in sys.modules, "triton imported"
        assert "nvlm_kernels._C" not in sys.modules, "_C imported"
        assert not torch.cuda.is_initialized(), "CUDA initialized"
        print("clean")
    """)
    assert result.returncode == 0 and "clean" in result.stdout, result.stderr


def test_works_without_the_extension_and_says_why():
    """A failed build leaves no _C: the package still imports, ops run on torch, and
    available_backends() gives the reason."""
    result = run_python("""
        import sys, importlib.abc
        class NoExtension(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "nvlm_kernels._C":
                    raise ImportError("simulated: extension not built")
        sys.meta_path.insert(0, NoExtension())
        import torch, nvlm_kernels as nk
        status = nk.available_backends()["native"]
        assert not status.available and "not built" in status.reason, status
        x = torch.randn(1, 36, 4)
        out = nk.pixel_shuffle_layernorm(x, torch.ones(16), torch.zeros(16))
        assert out.shape == (1, 9, 16)
        try:
            with nk.use_backend("native"):
                nk.pixel_shuffle_layernorm(x, torch.ones(16), torch.zeros(16))
        except RuntimeError as e:
            assert "unavailable" in str(e), e
            print("ok")
    """)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_available_backends_reports_each_backend():
    statuses = nk.available_backends()
    assert set(statuses) == {"torch", "triton", "native"}
    assert statuses["torch"].available and set(statuses["torch"].ops) == set(OPS)
    for status in statuses.values():
        assert status.reason  # always a reason, usable or not
        assert status.name in str(status)


def test_use_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown backend 'cudnn'"):
        with nk.use_backend("cudnn"):
            pass


def test_environment_variable_selects_backend(monkeypatch):
    x = torch.randn(2, 36, 4)
    monkeypatch.setenv("NVLM_KERNELS_BACKEND", "torch")
    assert _backends.implementation("pixel_shuffle_layernorm", x) is reference.pixel_shuffle_layernorm
    monkeypatch.setenv("NVLM_KERNELS_BACKEND", "fastest")
    with pytest.raises(ValueError, match="NVLM_KERNELS_BACKEND='fastest' is not a backend"):
        nk.pixel_shuffle(x)


def test_use_backend_overrides_environment_and_nests(monkeypatch):
    x = torch.randn(2, 36, 4)
    monkeypatch.setenv("NVLM_KERNELS_BACKEND", "native")
    with nk.use_backend("torch"):
        assert _backends.implementation("pixel_shuffle", x) is reference.pixel_shuffle
        with nk.use_backend("auto"):
            assert _backends.implementation("pixel_shuffle", x) is reference.pixel_shuffle
        assert _backends._requested_backend() == "torch"


def test_forced_backend_without_the_op_raises_instead_of_falling_back():
    if not nk.available_backends()["native"].available:
        pytest.skip("native backend not built")
    inputs = sample_inputs("cross_attention")
    with nk.use_backend("native"), pytest.raises(NotImplementedError,
                                                 match="backend 'native' has no implementation of cross_attention"):
        nk.cross_attention(**inputs)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET" in _backends._triton_device_error(torch.device("cpu"))
    assert _backends._triton_device_error(torch.device("cuda")) is None
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backends._triton_device_error(torch.device("cpu")) is None


def test_auto_prefers_native_on_cpu_and_falls_back_to_torch():
    x = torch.randn(2, 36, 4)
    chosen = _backends.implementation("pixel_shuffle_layernorm", x)
    if nk.available_backends()["native"].available:
        from nvlm_kernels import _native
        assert chosen is _native.pixel_shuffle_layernorm
    else:
        assert chosen is reference.pixel_shuffle_layernorm
    # no native implementation of cross_attention on the CPU: the reference runs
    assert _backends.implementation("cross_attention", x) is reference.cross_attention
