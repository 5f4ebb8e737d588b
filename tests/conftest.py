"""Shared fixtures: the same tests run on the CPU and, where one exists, on a CUDA device.

Triton kernels run on the CPU under TRITON_INTERPRET=1, which must be set before triton is
imported: this file sets it when there is no GPU (tests of Triton kernels carry the
`triton_interpret` marker). CUDA is probed through torch.cuda.is_available() only, which does
not create a CUDA context.
"""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def _fixed_seed():
    torch.manual_seed(0)



def kernel_backends() -> list:
    """The non-reference backends as test parameters; Triton ones carry the triton_interpret
    marker (on a CPU-only machine they run under the interpreter)."""
    return ["native", pytest.param("triton", marks=pytest.mark.triton_interpret)]


@pytest.fixture(params=kernel_backends())
def backend(request) -> str:
    return request.param



@pytest.fixture
def require_backend(backend, device):
    """require_backend(op, dtype) skips the test, with the reason, when `backend` cannot run
    `op` for `device` tensors of `dtype` (e.g. no CUDA kernel built)."""
    from nvlm_kernels.testing import backend_unavailable_reason

    def check(op: str, dtype: torch.dtype) -> None:
        reason = backend_unavailable_reason(backend, op, device, dtype)
        if reason:
            pytest.skip(reason)

    return check


@pytest.fixture
def triton_backend(request, device) -> str:
    """"triton" for a test module whose OP the Triton backend can run on `device` (under the
    interpreter on a CPU-only machine); the test is skipped, with the reason, otherwise."""
    from nvlm_kernels.testing import backend_unavailable_reason

    reason = backend_unavailable_reason("triton", request.module.OP, device, torch.float32)
    if reason:
        pytest.skip(reason)
    return "triton"
