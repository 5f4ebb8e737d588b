"""pixel_shuffle on every kernel backend (Triton; native CUDA where built) against the reference
(a permutation: exact)."""

from __future__ import annotations

import pytest
import torch

import nvlm_kernels as nk
from nvlm_kernels.testing import assert_matches_reference

OP = "pixel_shuffle"

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,side,c", [(1, 32, 96), (7, 8, 1024), (3, 6, 3200), (2, 6, 37)])
def test_matches_reference(backend, device, require_backend, dtype, n, side, c):
    require_backend(OP, dtype)
    x = torch.randn(n, side * side, c).to(device, dtype)
    assert_matches_reference(OP, {"x": x, "scale": 2}, backend)


@pytest.mark.parametrize("scale,grid", [(2, (4, 6)), (3, (6, 9)), (1, (5, 3))])
def test_non_square_grids_and_other_scales(backend, device, require_backend, scale, grid):
    require_backend(OP, torch.float32)
    x = torch.randn(2, grid[0] * grid[1], 5, device=device)
    assert_matches_reference(OP, {"x": x, "scale": scale, "grid": grid}, backend)


def test_non_contiguous_input(backend, device, require_backend):
    require_backend(OP, torch.float32)
    x = torch.randn(36, 3, 40, device=device).transpose(0, 1)[..., ::2]
    assert_matches_reference(OP, {"x": x}, backend)


def test_double_backward_is_exact(backend, device, require_backend):
    require_backend(OP, torch.float32)
    x = torch.randn(2, 16, 3, device=device, requires_grad=True)
    grad_out = torch.randn(2, 4, 12, device=device, requires_grad=True)
    with nk.use_backend(backend):
        (grad_x,) = torch.autograd.grad(nk.pixel_shuffle(x), x, grad_out, create_graph=True)
    weights = torch.randn_like(grad_x)
    (second,) = torch.autograd.grad((grad_x * weights).sum(), grad_out)
    torch.testing.assert_close(second, nk.reference.pixel_shuffle(weights), rtol=0, atol=0)


def test_torch_compile_without_graph_breaks(backend, device, require_backend):
    require_backend(OP, torch.float32)
    x = torch.randn(3, 36, 8, device=device, requires_grad=True)
    torch._dynamo.reset()
    with nk.use_backend(backend):
        out = torch.compile(lambda x: nk.pixel_shuffle(x + 1.0).sin(), fullgraph=True,
                            backend="aot_eager")(x)
        (grad,) = torch.autograd.grad(out.sum(), x)
    expected = nk.reference.pixel_shuffle(x + 1.0).sin()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(grad, torch.autograd.grad(expected.sum(), x)[0])


def test_native_opcheck(device):
    from nvlm_kernels.testing import backend_unavailable_reason

    if backend_unavailable_reason("native", OP, device, torch.float32):
        pytest.skip(f"no native {OP} for {device} (the native op is CUDA only)")
    x = torch.randn(2, 36, 5, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.nvlm_kernels.pixel_shuffle.default, (x, 2, 6, 6))
    torch.library.opcheck(torch.ops.nvlm_kernels.pixel_unshuffle.default,
                          (torch.randn(2, 9, 20, device=device, requires_grad=True), 5, 2, 6, 6))
