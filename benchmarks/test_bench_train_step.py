"""One NVLM-D training step (forward + backward + AdamW, SFT freeze set: projector + LLM trained,
ViT frozen) with the fused kernels (backend auto) vs the eager torch backend, in the same run.

tiny on the CPU (fp32, 7-tile images of 112 px), the 1b preset on a GPU (bf16 autocast, 7-tile
images of 448 px: 1792 image tokens per sample). Records tokens per step (report.py turns the time
into tokens/s) and, on CUDA, the peak allocated memory of the step.
"""

from __future__ import annotations

import pytest
import torch

import nvlm_kernels as nk
from bench_utils import synchronized
from nvlm import recipes
from nvlm.config import NVLMConfig
from nvlm.model import NVLM
from nvlm.train import build_optimizer

SAMPLES, TEXT_TOKENS, TILES = 4, 200, 7
IMPLS = {"eager": "torch", "fused": "auto"}


def preset(device: str) -> str:
    return "1b" if device == "cuda" else "tiny"


def packed_batch(config: NVLMConfig, device: str):
    generator = torch.Generator().manual_seed(0)
    image_tokens = TILES * config.tokens_per_tile
    length = image_tokens + TEXT_TOKENS
    ids = torch.randint(0, min(config.llm.vocab_size, 150_000), (SAMPLES, length),
                        generator=generator)
    ids[ids == config.image_token_id] = 0
    ids[:, 20:20 + image_tokens] = config.image_token_id
    ids = ids.reshape(-1)
    cu_seqlens = torch.arange(0, (SAMPLES + 1) * length, length, dtype=torch.int32)
    positions = torch.arange(length).repeat(SAMPLES)
    pixels = torch.randn(SAMPLES * TILES, 3, config.tile_size, config.tile_size,
                         generator=generator)
    tensors = dict(input_ids=ids, pixel_values=pixels, labels=ids, cu_seqlens=cu_seqlens,
                   position_ids=positions)
    return {k: v.to(device) for k, v in tensors.items()}, length


@pytest.mark.parametrize("impl", list(IMPLS))
def test_train_step(benchmark, device, impl):
    config = NVLMConfig.from_preset(preset(device))
    torch.manual_seed(0)
    with torch.device(device):
        model = NVLM(config)
    model.init_weights()
    recipe = recipes.recipe("D", "sft", preset(device))
    recipes.apply_freeze(model, recipe.trained)
    optimizer = build_optimizer(model, recipe)
    batch, length = packed_batch(config, device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")

    def step():
        with nk.use_backend(IMPLS[impl]), autocast:
            out = model(**batch, max_seqlen=length, return_logits=False)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()          # optimizer state allocated, kernels compiled
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(synchronized(step, device), rounds=3 if device == "cpu" else 5,
                       warmup_rounds=0)
    benchmark.group = f"train_step {device}"
    benchmark.extra_info.update(
        op="train_step", mode="fwd+bwd+adamw", impl=impl, device=device,
        dtype="bf16 autocast" if device == "cuda" else "float32",
        shape=f"{preset(device)} {SAMPLES}x{length}", tokens=SAMPLES * length,
        peak_memory_gb=torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None)
