"""multimodal_embed on every kernel backend (native C++/CUDA, Triton) against the float64
reference: placeholder counts, id ranges, id layouts, strides, compile, double backward, and
bad contents that must not read out of bounds."""

from __future__ import annotations

import pytest
import torch

import nvlm_kernels as nk
from nvlm_kernels.testing import assert_matches_reference, backend_unavailable_reason

OP = "multimodal_embed"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IMAGE = 151654  # Qwen2.5's <|vision_pad|>: inside the 152064-row table of the 72B model


def embed_inputs(ids: torch.Tensor, vocab: int, dim: int, dtype, device, image_id=IMAGE):
    count = int((ids == image_id).sum())
    return {"input_ids": ids.to(device), "embed_weight": torch.randn(vocab, dim).to(device, dtype),
            "image_embeds": torch.randn(count, dim).to(device, dtype), "image_token_id": image_id}


def random_ids(shape, vocab, image_fraction, image_id=IMAGE, dtype=torch.int64):
    ids = torch.randint(0, vocab, shape)
    ids[torch.rand(shape) < image_fraction] = image_id
    return ids.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("placeholders", ["none", "one", "many"])
def test_matches_reference(backend, device, require_backend, dtype, placeholders):
    require_backend(OP, dtype)
    ids = random_ids((3, 37), 40, {"none": 0.0, "one": 0.0, "many": 0.4}[placeholders])
    if placeholders == "one":
        ids[1, 5] = IMAGE
    ids[0, 0], ids[2, -1] = 0, 39  # both ends of the table
    assert_matches_reference(OP, embed_inputs(ids, 40, 72, dtype, device), backend)


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("shape", [(50,), (2, 25), (2, 1, 25), ()])
def test_id_layouts(backend, device, require_backend, id_dtype, shape):
    require_backend(OP, torch.float32)
    ids = random_ids(shape, 30, 0.3, image_id=30, dtype=id_dtype)  # placeholder outside the table
    assert_matches_reference(OP, embed_inputs(ids, 30, 20, torch.float32, device, image_id=30), backend)


def test_repeated_ids_accumulate(backend, device, require_backend):
    require_backend(OP, torch.float32)
    ids = torch.tensor([3, 3, 7, 3, 9, 7, 3, 3] * 9)  # long runs of one id in the table grad
    ids[::5] = 9
    assert_matches_reference(OP, embed_inputs(ids, 10, 33, torch.float32, device, image_id=9), backend)


@pytest.mark.parametrize("lengths", [(300, 41, 64), (64, 64, 1, 128), (63, 2, 193)])
def test_long_runs_of_one_id(backend, device, require_backend, lengths):
    """Runs of one id as long as real SFT batches have (template tokens, padding): longer than
    the Triton table gradient's chunk of 64 rows, ending exactly at a chunk boundary, starting at
    one, and crossing several, shuffled among placeholders and other ids."""
    require_backend(OP, torch.float32)
    torch.manual_seed(len(lengths))
    ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]
                    + [torch.randint(0, 20, (30,)), torch.full((25,), 20)])
    assert_matches_reference(OP, embed_inputs(ids, 20, 24, torch.float32, device, image_id=20),
                             backend)
    shuffled = ids[torch.randperm(ids.numel())]
    assert_matches_reference(OP, embed_inputs(shuffled, 20, 24, torch.float32, device,
                                              image_id=20), backend)


def test_strided_table_and_images(backend, device, require_backend):
    require_backend(OP, torch.float32)
    ids = random_ids((40,), 25, 0.3, image_id=99)
    count = int((ids == 99).sum())
    table = torch.randn(24, 25, device=device).t()                # column-major (25, 24)
    images = torch.randn(count, 48, device=device)[:, ::2]          # row stride 48, element stride 2
    assert not table.is_contiguous() and not images.is_contiguous()
    inputs = {"input_ids": ids.to(device), "embed_weight": table, "image_embeds": images,
              "image_token_id": 99}
    assert_matches_reference(OP, inputs, backend)


def test_double_backward_is_exact(backend, device, require_backend):
    """The backward is linear in grad_out; its adjoint is the forward."""
    require_backend(OP, torch.float32)
    ids = random_ids((2, 9), 12, 0.3, image_id=12).to(device)
    count = int((ids == 12).sum())
    results = []
    for name in ("torch", backend):
        torch.manual_seed(1)  # the same tables and gradients for both backends
        table = torch.randn(12, 5, device=device, requires_grad=True)
        images = torch.randn(count, 5, device=device, requires_grad=True)
        grad_out = torch.randn(2, 9, 5, device=device, requires_grad=True)
        with nk.use_backend(name):
            out = nk.multimodal_embed(ids, table, images, 12)
        grad_table, grad_images = torch.autograd.grad(out, (table, images), grad_out, create_graph=True)
        weights_t, weights_i = torch.randn_like(grad_table), torch.randn_like(grad_images)
        (second,) = torch.autograd.grad((grad_table * weights_t).sum() + (grad_images * weights_i).sum(),
                                        grad_out)
        results.append(second)
    torch.testing.assert_close(results[1], results[0])


@pytest.mark.parametrize("frozen", ["embed_weight", "image_embeds"])
def test_frozen_inputs_get_no_gradient(backend, device, require_backend, frozen):
    """A frozen table (NVLM pretraining trains only the projector) must cost no (V, D) gradient."""
    require_backend(OP, torch.float32)
    ids = random_ids((3, 8), 20, 0.3, image_id=20).to(device)
    inputs = embed_inputs(ids, 20, 6, torch.float32, device, image_id=20)
    trained = "image_embeds" if frozen == "embed_weight" else "embed_weight"
    inputs[trained].requires_grad_(True)
    with nk.use_backend(backend):
        out = nk.multimodal_embed(**inputs)
    (grad,) = torch.autograd.grad(out.square().sum(), inputs[trained])
    with nk.use_backend("torch"):
        expected = nk.multimodal_embed(**inputs)
    torch.testing.assert_close(grad, torch.autograd.grad(expected.square().sum(), inputs[trained])[0])
    assert inputs[frozen].grad is None


def test_zero_width(backend, device, require_backend):
    require_backend(OP, torch.float32)
    assert_matches_reference(OP, embed_inputs(random_ids((2, 5), 9, 0.3, image_id=9), 9, 0,
                                              torch.float32, device, image_id=9), backend)


def test_bad_contents_never_read_out_of_bounds(backend, device, require_backend):
    """Without validation (as on a GPU without NVLM_KERNELS_DEBUG), ids outside the table and
    extra placeholders give zero rows instead of out-of-bounds reads."""
    require_backend(OP, torch.float32)
    op = {"native": torch.ops.nvlm_kernels.multimodal_embed,
          "triton": torch.ops.nvlm_triton.multimodal_embed}[backend]
    table = torch.randn(4, 8, device=device)
    images = torch.randn(1, 8, device=device)
    ids = torch.tensor([1, -5, 4, 1000, 7, 7, 2], device=device)  # 7 = placeholder, one image row
    out = op(ids, table, images, 7)
    torch.testing.assert_close(out[[0, 6]], table[[1, 2]])
    torch.testing.assert_close(out[4], images[0])
    assert torch.equal(out[[1, 2, 3, 5]], torch.zeros(4, 8, device=device))


def test_torch_compile_without_graph_breaks(backend, device, require_backend):
    require_backend(OP, torch.float32)
    ids = random_ids((2, 11), 16, 0.3, image_id=16).to(device)
    table = torch.randn(16, 8, device=device, requires_grad=True)
    images = torch.randn(int((ids == 16).sum()), 8, device=device, requires_grad=True)

    def decoder_input(ids, table, images):
        return nk.multimodal_embed(ids, table, images * 0.5, 16).tanh()

    torch._dynamo.reset()
    with nk.use_backend(backend):
        out = torch.compile(decoder_input, fullgraph=True, backend="aot_eager")(ids, table, images)
        grads = torch.autograd.grad(out.sum(), (table, images))
    with nk.use_backend("torch"):
        expected = decoder_input(ids, table, images)
    expected_grads = torch.autograd.grad(expected.sum(), (table, images))
    torch.testing.assert_close(out, expected)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)


def test_native_opcheck(device):
    if backend_unavailable_reason("native", OP, device, torch.float32):
        pytest.skip(f"no native {OP} for {device}")
    ids = random_ids((3, 7), 10, 0.3, image_id=10).to(device)
    table = torch.randn(10, 6, device=device, requires_grad=True)
    images = torch.randn(int((ids == 10).sum()), 6, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.nvlm_kernels.multimodal_embed.default, (ids, table, images, 10))
    torch.library.opcheck(torch.ops.nvlm_kernels.multimodal_embed_backward.default,
                          (torch.randn(3, 7, 6, device=device), ids, 10, images.shape[0], 10))


SPARSE_BACKENDS = ["torch", "native", pytest.param("triton", marks=pytest.mark.triton_interpret)]


@pytest.mark.parametrize("sparse_backend", SPARSE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_sparse_table_gradient(device, sparse_backend, dtype):
    """sparse_grad=True: the table gradient is an uncoalesced sparse tensor (one entry per token)
    whose sum is the dense gradient, image gradients unchanged; runs of one id, a placeholder
    inside the table, int32 ids, (2, 3, 29) ids."""
    if backend_unavailable_reason(sparse_backend, OP, device, dtype):
        pytest.skip(f"no {sparse_backend} {OP} for {device} {dtype}")
    ids = random_ids((2, 3, 29), 23, 0.3, image_id=17, dtype=torch.int32)
    ids[1, 2, :12] = 4                                           # a run of one id
    inputs = embed_inputs(ids, 23, 40, dtype, device, image_id=17)
    table = inputs["embed_weight"].requires_grad_(True)
    images = inputs["image_embeds"].requires_grad_(True)
    grad_out = torch.randn(2, 3, 29, 40).to(device, dtype)
    with nk.use_backend(sparse_backend):
        out = nk.multimodal_embed(**inputs, sparse_grad=True)
    grad_table, grad_images = torch.autograd.grad(out, (table, images), grad_out)
    table64, images64 = (t.detach().double().requires_grad_(True) for t in (table, images))
    expected = nk.reference.multimodal_embed(ids.to(device), table64, images64, 17)
    want_table, want_images = torch.autograd.grad(expected, (table64, images64), grad_out.double())
    assert grad_table.is_sparse and grad_table._nnz() == ids.numel()
    tolerance = 1e-2 if dtype == torch.float16 else 1e-5   # to_dense sums a run in `dtype`
    for got, want in ((out, expected), (grad_table.to_dense(), want_table),
                      (grad_images, want_images)):
        torch.testing.assert_close(got.double(), want, rtol=tolerance, atol=tolerance)


def test_sparse_gradient_accumulates_into_dense_grad(device):
    """With a dense .grad already there (a tied output layer, accumulation, zero_grad without
    set_to_none) autograd adds the sparse gradient into it and .grad stays dense; with none it
    becomes sparse, and SGD then takes the same step as the dense gradient would."""
    ids = random_ids((4, 15), 30, 0.25, image_id=30).to(device)
    inputs = embed_inputs(ids, 30, 8, torch.float32, device, image_id=30)
    grad_out = torch.randn(4, 15, 8, device=device)
    dense, sparse = (inputs["embed_weight"].clone().requires_grad_(True) for _ in range(2))
    nk.multimodal_embed(ids, dense, inputs["image_embeds"], 30).backward(grad_out)
    earlier = torch.randn_like(dense)
    sparse.grad = earlier.clone()
    nk.multimodal_embed(ids, sparse, inputs["image_embeds"], 30, sparse_grad=True).backward(grad_out)
    assert not sparse.grad.is_sparse
    torch.testing.assert_close(sparse.grad, earlier + dense.grad)

    sparse.grad = None
    nk.multimodal_embed(ids, sparse, inputs["image_embeds"], 30, sparse_grad=True).backward(grad_out)
    assert sparse.grad.is_sparse
    for parameter in (dense, sparse):
        torch.optim.SGD([parameter], lr=0.1).step()
    torch.testing.assert_close(sparse, dense)


def test_sparse_gradient_with_bad_contents(backend, device, require_backend):
    """Unvalidated contents (a GPU without NVLM_KERNELS_DEBUG): ids outside the table and an
    image row without a placeholder get no gradient, as the forward read them as zero rows."""
    require_backend(OP, torch.float32)
    from nvlm_kernels._sparse_embedding import multimodal_embed_sparse_grad

    op = {"native": torch.ops.nvlm_kernels.multimodal_embed,
          "triton": torch.ops.nvlm_triton.multimodal_embed}[backend]
    table = torch.randn(4, 8, device=device, requires_grad=True)
    images = torch.randn(2, 8, device=device, requires_grad=True)   # one placeholder, two rows
    ids = torch.tensor([1, -5, 4, 1000, 7, 2, 1], device=device)
    out = multimodal_embed_sparse_grad(op, ids, table, images, 7)
    grad_out = torch.randn_like(out)
    grad_table, grad_images = torch.autograd.grad(out, (table, images), grad_out)
    expected_table = torch.zeros(4, 8, device=device)
    expected_table[1] = grad_out[0] + grad_out[6]
    expected_table[2] = grad_out[5]
    torch.testing.assert_close(grad_table.to_dense(), expected_table)
    torch.testing.assert_close(grad_images, torch.stack([grad_out[4], torch.zeros(8, device=device)]))


def test_sparse_grad_must_be_a_bool(device):
    inputs = embed_inputs(random_ids((5,), 9, 0.0), 9, 4, torch.float32, device)
    with pytest.raises(TypeError, match="sparse_grad must be a bool"):
        nk.multimodal_embed(**inputs, sparse_grad=1)
