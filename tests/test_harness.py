"""The comparison helper must be able to fail: wrong values, unwritten (poisoned) outputs and
wrong gradients are caught, and fp16 tolerances follow the reference's own error."""

from __future__ import annotations

import pytest
import torch

from nvlm_kernels import _backends, _memory, reference
from nvlm_kernels.testing import compare_with_reference, poisoned_outputs, sample_inputs


@pytest.fixture
def fake_backend(monkeypatch):
    """Install `fn` as the torch backend's pixel_shuffle_layernorm for one test."""
    def install(fn):
        impls = _backends._torch_implementations()
        impls["pixel_shuffle_layernorm"] = _backends.Implementation(fn, _backends._any_device)
        monkeypatch.setitem(_backends._loaded, "fake", (None, impls))
        monkeypatch.setattr(_backends, "BACKEND_NAMES", _backends.BACKEND_NAMES + ("fake",))
    return install


def test_correct_backend_passes(fake_backend):
    fake_backend(reference.pixel_shuffle_layernorm)
    assert compare_with_reference("pixel_shuffle_layernorm", sample_inputs("pixel_shuffle_layernorm"), "fake").ok


def test_small_forward_error_is_caught(fake_backend):
    fake_backend(lambda x, w, b, **kw: reference.pixel_shuffle_layernorm(x, w, b, **kw) * (1 + 1e-4))
    result = compare_with_reference("pixel_shuffle_layernorm", sample_inputs("pixel_shuffle_layernorm"), "fake")
    assert not result.ok and not result.measurements[0].ok


def test_wrong_gradient_is_caught(fake_backend):
    class WrongBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, y):
            return y.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * 1.01

    fake_backend(lambda x, w, b, **kw: WrongBackward.apply(reference.pixel_shuffle_layernorm(x, w, b, **kw)))
    result = compare_with_reference("pixel_shuffle_layernorm", sample_inputs("pixel_shuffle_layernorm"), "fake")
    assert result.measurements[0].ok  # forward is right ...
    assert not result.ok              # ... and the gradients are not


def test_wrong_output_dtype_is_caught(fake_backend):
    fake_backend(lambda x, w, b, **kw: reference.pixel_shuffle_layernorm(x.float(), w.float(), b.float(), **kw))
    inputs = sample_inputs("pixel_shuffle_layernorm", dtype=torch.bfloat16)
    result = compare_with_reference("pixel_shuffle_layernorm", inputs, "fake")
    assert not result.ok and "out is torch.float32" in result.problems[0]


def test_unwritten_output_rows_are_caught_by_poisoning(fake_backend):
    def forgets_last_row(x, w, b, **kw):
        expected = reference.pixel_shuffle_layernorm(x, w, b, **kw)
        out = _memory.new_output(expected.shape, dtype=expected.dtype, device=expected.device)
        out[:, :-1] = expected[:, :-1]
        return out

    fake_backend(forgets_last_row)
    result = compare_with_reference("pixel_shuffle_layernorm", sample_inputs("pixel_shuffle_layernorm"),
                                    "fake", check_grads=False)
    assert not result.ok


def test_poisoned_outputs_restores_environment(monkeypatch):
    monkeypatch.delenv("NVLM_KERNELS_POISON", raising=False)
    with poisoned_outputs():
        assert torch.isnan(_memory.new_output((3,), dtype=torch.float32, device="cpu")).all()
    assert not _memory.poison_enabled()


def test_fp16_tolerance_scales_with_reference_error():
    result = compare_with_reference("varlen_attention", sample_inputs("varlen_attention", dtype=torch.float16),
                                    "torch")
    for m in result.measurements:
        assert m.reference_error is not None and m.tolerance == pytest.approx(
            2 * m.reference_error + torch.finfo(torch.float16).eps)
