"""The benchmarks' `device` fixture: CPU, plus CUDA where there is one."""

from __future__ import annotations

import pytest

from bench_utils import DEVICES


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param
