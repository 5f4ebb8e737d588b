"""multimodal_embed: every backend vs eager (F.embedding + masked_scatter) for an NVLM-D SFT
batch: 8 packed rows x 4096 tokens, 40% of them image placeholders, vocabulary 152064 (Qwen2),
width 8192 on the GPU (72B) and 896 on the CPU (Qwen2-0.5B, so the fp32 table fits in memory)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import nvlm_kernels as nk
from bench_utils import (IMPLEMENTATIONS, bench_dtype, on_backend, record,
                         require_implementation, synchronized)

OP = "multimodal_embed"
ROWS, TOKENS, VOCAB, IMAGE_FRACTION = 8, 4096, 152064, 0.4
IMAGE_TOKEN = 151654


def width(device: str) -> int:
    return 8192 if device == "cuda" else 896


def eager_multimodal_embed(ids, table, images, image_token_id):
    is_image = ids == image_token_id
    text = F.embedding(ids.masked_fill(is_image, 0), table)
    return text.masked_scatter(is_image.unsqueeze(-1), images)


def implementation(impl: str):
    return eager_multimodal_embed if impl == "eager" else on_backend(impl, nk.multimodal_embed)


def inputs(device: str, requires_grad: bool):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (ROWS, TOKENS), generator=generator)
    ids[torch.rand(ROWS, TOKENS, generator=generator) < IMAGE_FRACTION] = IMAGE_TOKEN
    dtype, dim = bench_dtype(device), width(device)
    table = torch.randn(VOCAB, dim, device=device, dtype=dtype, requires_grad=requires_grad)
    images = torch.randn(int((ids == IMAGE_TOKEN).sum()), dim, device=device, dtype=dtype,
                         requires_grad=requires_grad)
    return ids.to(device), table, images


def shape(device: str) -> str:
    return f"{ROWS}x{TOKENS}x{width(device)}"


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_forward(benchmark, device, impl):
    require_implementation(impl, OP, device)
    ids, table, images = inputs(device, requires_grad=False)
    fn = implementation(impl)
    rows_bytes = ids.numel() * width(device) * bench_dtype(device).itemsize
    # read one row per token (table or image), write it
    record(benchmark, op=OP, mode="forward", impl=impl, device=device, shape=shape(device),
           nbytes=2 * rows_bytes)
    out = benchmark(synchronized(lambda: fn(ids, table, images, IMAGE_TOKEN), device))
    assert out.shape == (ROWS, TOKENS, width(device))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_forward_backward(benchmark, device, impl):
    require_implementation(impl, OP, device)
    ids, table, images = inputs(device, requires_grad=True)
    grad = torch.randn(ROWS, TOKENS, width(device), device=device, dtype=table.dtype)
    fn = implementation(impl)
    itemsize = bench_dtype(device).itemsize
    rows_bytes = ids.numel() * width(device) * itemsize
    # forward 2 passes over the rows; backward: read grad, write image and table rows, and zero
    # the rest of the (dense) table gradient
    record(benchmark, op=OP, mode="forward+backward", impl=impl, device=device, shape=shape(device),
           nbytes=4 * rows_bytes + VOCAB * width(device) * itemsize)

    def step():
        return torch.autograd.grad(fn(ids, table, images, IMAGE_TOKEN), (table, images), grad)

    grads = benchmark(synchronized(step, device))
    assert grads[0].shape == table.shape
