"""pixel_shuffle_layernorm on every kernel backend (native C++/CUDA, Triton) against the float64
reference, plus opcheck, torch.compile, determinism and edge cases."""

from __future__ import annotations

import pytest
import torch

import nvlm_kernels as nk
from nvlm_kernels.testing import assert_matches_reference

OP = "pixel_shuffle_layernorm"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def psln_inputs(n, side, c, dtype, device, scale=2, grid=None):
    tokens = side * side if grid is None else grid[0] * grid[1]
    width = c * scale * scale
    # an offset mean and a spread make the statistics non-trivial
    return {"x": (torch.randn(n, tokens, c) * 2 + 0.7).to(device, dtype),
            "weight": torch.randn(width).to(device, dtype),
            "bias": torch.randn(width).to(device, dtype), "eps": 1e-5, "scale": scale,
            "grid": grid}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,side,c", [(1, 32, 96), (7, 8, 1024), (3, 6, 3200), (2, 6, 37)])
def test_matches_reference(backend, device, require_backend, dtype, n, side, c):
    require_backend(OP, dtype)
    assert_matches_reference(OP, psln_inputs(n, side, c, dtype, device), backend)


@pytest.mark.slow
def test_matches_reference_at_nvlm_shape(backend, device, require_backend):
    """One InternViT-6B tile: 1024 tokens x 3200 channels -> 256 x 12800."""
    require_backend(OP, torch.float32)
    if backend == "triton" and device == "cpu":
        pytest.skip("too slow for the Triton interpreter; the smaller shapes cover the kernel")
    assert_matches_reference(OP, psln_inputs(1, 32, 3200, torch.float32, device), backend)


@pytest.mark.parametrize("scale,grid", [(2, (4, 6)), (3, (6, 9)), (1, (5, 3))])
def test_non_square_grids_and_other_scales(backend, device, require_backend, scale, grid):
    require_backend(OP, torch.float32)
    assert_matches_reference(OP, psln_inputs(2, 0, 5, torch.float32, device, scale, grid), backend)


def test_non_contiguous_input(backend, device, require_backend):
    require_backend(OP, torch.float32)
    base = torch.randn(36, 3, 40, device=device) + 0.3
    x = base.transpose(0, 1)[..., ::2]  # (3, 36, 20), strided in every dim
    assert not x.is_contiguous()
    inputs = {"x": x, "weight": torch.randn(80, device=device)[None].expand(2, 80)[0],
              "bias": torch.randn(160, device=device)[::2], "eps": 1e-6}
    assert_matches_reference(OP, inputs, backend)


def test_float32_parameters_with_half_activations(backend, device, require_backend):
    """fp32 LayerNorm parameters with fp16 activations: output in fp16, parameter grads in fp32."""
    require_backend(OP, torch.float16)
    x = torch.randn(2, 36, 8, device=device, dtype=torch.float16, requires_grad=True)
    weight = torch.randn(32, device=device, requires_grad=True)
    bias = torch.randn(32, device=device, requires_grad=True)
    with nk.use_backend(backend):
        out = nk.pixel_shuffle_layernorm(x, weight, bias)
    assert out.dtype == torch.float16
    out.float().sum().backward()
    assert weight.grad.dtype == torch.float32 and bias.grad.dtype == torch.float32
    expected = nk.reference.pixel_shuffle_layernorm(x.double(), weight.double(), bias.double())
    torch.testing.assert_close(out.double(), expected, atol=4e-3, rtol=4e-3)


def test_empty_batch(backend, device, require_backend):
    require_backend(OP, torch.float32)
    x = torch.randn(0, 36, 4, device=device, requires_grad=True)
    weight = torch.randn(16, device=device, requires_grad=True)
    bias = torch.randn(16, device=device, requires_grad=True)
    with nk.use_backend(backend):
        out = nk.pixel_shuffle_layernorm(x, weight, bias)
    assert out.shape == (0, 9, 16)
    out.sum().backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight))
    assert x.grad.shape == x.shape


def test_backward_is_deterministic(backend, device, require_backend):
    require_backend(OP, torch.float32)
    x = torch.randn(5, 64, 48, device=device, requires_grad=True)
    weight = torch.randn(192, device=device, requires_grad=True)
    bias = torch.randn(192, device=device, requires_grad=True)
    grad = torch.randn(5, 16, 192, device=device)
    results = []
    with nk.use_backend(backend):
        for _ in range(2):
            results.append(torch.autograd.grad(nk.pixel_shuffle_layernorm(x, weight, bias),
                                               (x, weight, bias), grad))
    for first, second in zip(*results):
        assert torch.equal(first, second)


def test_native_backward_does_not_depend_on_thread_count():
    if nk.available_backends()["native"].available is False:
        pytest.skip(nk.available_backends()["native"].reason)
    x = torch.randn(7, 64, 40, requires_grad=True)
    weight, bias = torch.randn(160, requires_grad=True), torch.randn(160, requires_grad=True)
    grad = torch.randn(7, 16, 160)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 3):
            torch.set_num_threads(count)
            with nk.use_backend("native"):
                results.append(torch.autograd.grad(nk.pixel_shuffle_layernorm(x, weight, bias),
                                                   (x, weight, bias), grad))
    finally:
        torch.set_num_threads(threads)
    for first, second in zip(*results):
        assert torch.equal(first, second)


def test_double_backward_is_refused_not_silently_zero(backend, device, require_backend):
    require_backend(OP, torch.float32)
    x = torch.randn(1, 16, 4, device=device, requires_grad=True)
    weight = torch.randn(16, device=device, requires_grad=True)
    bias = torch.randn(16, device=device, requires_grad=True)
    with nk.use_backend(backend):
        out = nk.pixel_shuffle_layernorm(x, weight, bias)
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(out.square().sum(), x, create_graph=True)


def test_torch_compile_without_graph_breaks(backend, device, require_backend):
    require_backend(OP, torch.float32)
    x = torch.randn(3, 36, 8, device=device, requires_grad=True)
    weight = torch.randn(32, device=device, requires_grad=True)
    bias = torch.randn(32, device=device, requires_grad=True)

    def projector_head(x, weight, bias):
        return nk.pixel_shuffle_layernorm(x * 2.0, weight, bias).relu()

    torch._dynamo.reset()
    with nk.use_backend(backend):
        compiled = torch.compile(projector_head, fullgraph=True, backend="aot_eager")
        out = compiled(x, weight, bias)
        grads = torch.autograd.grad(out.sum(), (x, weight, bias))
    with nk.use_backend("torch"):
        expected = projector_head(x, weight, bias)
    expected_grads = torch.autograd.grad(expected.sum(), (x, weight, bias))
    torch.testing.assert_close(out, expected)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)


def test_native_opcheck(device):
    if nk.available_backends()["native"].available is False:
        pytest.skip(nk.available_backends()["native"].reason)
    from nvlm_kernels.testing import backend_unavailable_reason

    if backend_unavailable_reason("native", OP, device, torch.float32):
        pytest.skip(f"no native {OP} for {device}")
    x = torch.randn(2, 16, 6, device=device, requires_grad=True)
    weight = torch.randn(24, device=device, requires_grad=True)
    bias = torch.randn(24, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.nvlm_kernels.pixel_shuffle_layernorm.default,
                          (x, weight, bias, 1e-5, 2, 4, 4))
    out, mean, rstd = torch.ops.nvlm_kernels.pixel_shuffle_layernorm(x, weight, bias, 1e-5, 2, 4, 4)
    torch.library.opcheck(torch.ops.nvlm_kernels.pixel_shuffle_layernorm_backward.default,
                          (torch.randn_like(out), x.detach(), weight.detach(), mean, rstd, 2, 4, 4))


def test_triton_rejects_rows_too_wide_for_registers(device):
    pytest.importorskip("triton")
    x = torch.randn(1, 4, 8200, device=device)
    with nk.use_backend("triton"), pytest.raises(ValueError, match="C = 8200 is too wide"):
        nk.pixel_shuffle_layernorm(x, torch.ones(32800, device=device), torch.zeros(32800, device=device))
