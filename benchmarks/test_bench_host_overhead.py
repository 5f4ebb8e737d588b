"""Host time per call of each op, with tiny tensors so that the work itself is negligible: what a
decode step or a small layer pays per op on top of its kernels.

Rows (extra_info "stage"):
  validate: the public call up to the backend (its input checks), on meta tensors: shapes,
      dtypes and devices, which is what a GPU call checks (CPU tensors also have their contents
      read, which GPU tensors skip unless NVLM_KERNELS_DEBUG=1);
  dispatch: choosing the backend (_backends.implementation; answers are kept per op, device
      type, dtype and request);
  call: the whole public call on the device with each backend there (on a GPU not synchronized:
      the host's time to validate and launch, not the kernels').
Minimum times on the 2-core CPU machine (2026-11-28, python 3.11, torch 2.13): validate 2.0 us
(pixel_shuffle), 4.5 (pixel_shuffle_layernorm), 4.6 (multimodal_embed), 8.4 (cross_attention),
10.9 (varlen_attention); dispatch 2.3 us (5.2 before the answers were kept). The triton launch
itself (and the attention launchers' config lookup, now asked once per device) is a GPU row.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch

import nvlm_kernels as nk
from nvlm_kernels import _backends
from nvlm_kernels._implementation import OPS
from nvlm_kernels.testing import backend_unavailable_reason, sample_inputs

BACKENDS = ["torch", "native", "triton"]


def _first_tensor(inputs: dict) -> torch.Tensor:
    return next(v for v in inputs.values() if isinstance(v, torch.Tensor) and v.is_floating_point())


@pytest.mark.parametrize("op", OPS)
def test_validate(benchmark, op):
    inputs = sample_inputs(op, "meta")
    benchmark.extra_info.update(op=op, stage="validate", device="meta")
    # the public call with the backend stubbed out: what remains is the op's input checks
    with mock.patch.object(_backends, "implementation", lambda op, tensor: lambda *a, **k: None):
        benchmark(lambda: getattr(nk, op)(**inputs))


@pytest.mark.parametrize("op", OPS)
def test_dispatch(benchmark, device, op):
    tensor = _first_tensor(sample_inputs(op, device))
    benchmark.extra_info.update(op=op, stage="dispatch", device=device)
    assert callable(benchmark(lambda: _backends.implementation(op, tensor)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_call(benchmark, device, op, backend):
    if backend == "triton" and device == "cpu":
        pytest.skip("triton runs on the CPU only under the interpreter; nothing to time")
    reason = backend_unavailable_reason(backend, op, device, torch.float32)
    if reason:
        pytest.skip(reason)
    inputs = sample_inputs(op, device)
    benchmark.extra_info.update(op=op, stage="call", device=device, backend=backend)
    with nk.use_backend(backend):
        out = benchmark(lambda: getattr(nk, op)(**inputs))
    assert out.shape[0] == next(iter(inputs.values())).shape[0]
