"""One NVLM training step (forward + backward + AdamW, the SFT freeze set of the paper, ViT
frozen) with the fused kernels (backend auto) vs the eager torch backend, in the same run, for
NVLM-D, -X and -H on the same images and text.

tiny on the CPU (fp32, 7-tile images of 112 px), the 1b preset on a GPU (bf16 autocast, 7-tile
images of 448 px: 1792 image tokens per sample). D puts every tile's tokens into the decoder, X
none (its X-attn blocks read all tiles), H the thumbnail's (X-attn reads the other six after
their tag tokens) -- the paper's efficiency argument for X at high resolution. Records tokens per
step (report.py turns the time into tokens/s; for X and H the X-attn memory is not counted) and,
on CUDA, the peak allocated memory of the step.
"""

from __future__ import annotations

import pytest
import torch

import nvlm_kernels as nk
from bench_utils import synchronized
from nvlm import recipes
from nvlm.config import NVLMConfig
from nvlm.model import NVLM
from nvlm.recipes import build_optimizer
from nvlm.packing import XAttnInputs

SAMPLES, TEXT_TOKENS, TILES = 4, 200, 7
IMAGE_START = 20        # text tokens before the image in each sample
TAG_TOKENS = 4          # NVLM-H: tokens of each embedded <tile_k> in the memory
IMPLS = {"eager": "torch", "fused": "auto"}


def preset(device: str) -> str:
    return "1b" if device == "cuda" else "tiny"


def packed_batch(config: NVLMConfig, device: str):
    """SAMPLES packed samples of TEXT_TOKENS text tokens and one TILES-tile image each, laid out
    for config.arch; returns the model's keyword arguments and the sample length."""
    generator = torch.Generator().manual_seed(0)
    q = config.tokens_per_tile
    decoder_tiles = {"D": TILES, "X": 0, "H": 1}[config.arch]
    length = decoder_tiles * q + TEXT_TOKENS

    def random_ids(*shape):
        ids = torch.randint(0, min(config.llm.vocab_size, 150_000), shape, generator=generator)
        return torch.where(ids == config.image_token_id, 0, ids)

    ids = random_ids(SAMPLES, length)
    ids[:, IMAGE_START:IMAGE_START + decoder_tiles * q] = config.image_token_id
    cu_seqlens = torch.arange(0, (SAMPLES + 1) * length, length, dtype=torch.int32)
    pixels = torch.randn(SAMPLES * TILES, 3, config.tile_size, config.tile_size,
                         generator=generator)
    tensors = dict(input_ids=ids.reshape(-1), pixel_values=pixels, labels=ids.reshape(-1),
                   cu_seqlens=cu_seqlens, position_ids=torch.arange(length).repeat(SAMPLES))
    tensors = {k: v.to(device) for k, v in tensors.items()}
    if config.arch != "D":
        tensors["xattn"] = xattn_inputs(config, length, random_ids).to(device)
    return tensors, length


def xattn_inputs(config: NVLMConfig, length: int, random_ids) -> XAttnInputs:
    """X: every tile in the memory; H: the last tile (thumbnail) in the decoder, the others in
    the memory after TAG_TOKENS tag ids. Text from the image on sees its sample's memory."""
    q, tiles = config.tokens_per_tile, torch.arange(SAMPLES * TILES).view(SAMPLES, TILES)
    memory_ids = None
    if config.arch == "X":
        decoder_tiles, memory_tiles, per_sample = tiles[:, :0], tiles, TILES * q
    else:
        decoder_tiles, memory_tiles = tiles[:, -1:], tiles[:, :-1]
        per_sample = (TILES - 1) * (TAG_TOKENS + q)
        memory_ids = random_ids(SAMPLES * (TILES - 1), TAG_TOKENS + q)
        memory_ids[:, TAG_TOKENS:] = config.image_token_id
    sample = torch.arange(SAMPLES).repeat_interleave(length)
    sees = torch.arange(length).repeat(SAMPLES) >= IMAGE_START
    start = torch.where(sees, sample * per_sample, 0).int()
    end = torch.where(sees, (sample + 1) * per_sample, 0).int()
    return XAttnInputs(decoder_tiles=decoder_tiles.reshape(-1),
                       memory_tiles=memory_tiles.reshape(-1),
                       memory_ids=None if memory_ids is None else memory_ids.reshape(-1),
                       kv_start=start, kv_end=end)


@pytest.mark.parametrize("arch", ["D", "X", "H"])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_train_step(benchmark, device, impl, arch):
    config = NVLMConfig.from_preset(preset(device), arch=arch)
    torch.manual_seed(0)
    with torch.device(device):
        model = NVLM(config)
    model.init_weights()
    recipe = recipes.recipe(arch, "sft", preset(device))
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
    benchmark.group = f"train_step {device} NVLM-{arch}"   # set before the run, or it is lost
    benchmark.pedantic(synchronized(step, device), rounds=3 if device == "cpu" else 5,
                       warmup_rounds=0)
    benchmark.extra_info.update(
        op="train_step", mode="fwd+bwd+adamw", impl=impl, device=device,
        dtype="bf16 autocast" if device == "cuda" else "float32",
        shape=f"{preset(device)}-{arch} {SAMPLES}x{length}", tokens=SAMPLES * length,
        peak_memory_gb=torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None)
