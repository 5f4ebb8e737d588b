"""Generation with a static KV cache: greedy or temperature / top-p sampling, several prompts at once.

    tokens = generate(model, [ids_a, ids_b], pixel_values, max_new_tokens=32,
                      stop_token_ids=tokenizer.eos_token_ids)

The prompts are packed into one row and prefilled in a single forward (images included); then each
step feeds one token per prompt. Every prompt owns one row of the cache and its tokens sit at their
own positions, so prompts of different lengths need no padding. The loop allocates nothing and
looks at the host only every `stop_check_every` steps, to see whether all prompts have stopped.
"""

from __future__ import annotations

import math

from typing import Sequence

import torch
import torch.nn.functional as F

from .errors import InputError
from .llm import KVCache
from .packing import PackedLayout, XAttnInputs, pack_samples, sample_positions, token_packer


def sample_next(logits_BV: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token of every row: argmax when temperature is 0, else a draw from the softmax at
    that temperature restricted to the smallest set of tokens whose probability reaches top_p."""
    if temperature == 0.0:
        return logits_BV.argmax(dim=-1)
    probs = torch.softmax(logits_BV.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep a token if the mass before it is still short of top_p (the first one always is).
        keep_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) < top_p
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        probs = probs.masked_fill(~keep, 0.0)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, prompts: Sequence[torch.Tensor], pixel_values: torch.Tensor | None = None, *,
             xattn: XAttnInputs | None = None, max_new_tokens: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, stop_token_ids: Sequence[int] = (),
             generator: torch.Generator | None = None,
             stop_check_every: int = 8) -> list[list[int]]:
    """New tokens for each prompt, up to and excluding its first stop token.

    Args:
        model: an NVLM (anything with `embed`, `language_model` and `config.llm`).
        prompts: 1-D id tensors; their image placeholders are filled, in order, by the tiles of
            pixel_values (all prompts' tiles concatenated in prompt order).
        xattn: NVLM-X/H, the X-attn inputs of the prompts packed in order (`pack_samples(...)
            .xattn`). The memory's keys and values are computed once, before the prefill; every
            new token sees what its prompt's last token sees (the memory of the prompt's latest
            image, or nothing).
        temperature: 0 for greedy decoding.
        top_p: nucleus sampling mass (1 keeps the whole distribution).
        stop_token_ids: tokens that end a prompt's answer.
    """
    if not prompts:
        raise InputError("prompts: expected at least one prompt, got none")
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens: expected >= 1, got {max_new_tokens}")
    if not (math.isfinite(temperature) and temperature >= 0) or not 0 < top_p <= 1:  # NaN too
        raise InputError(f"temperature/top_p: expected temperature >= 0 and 0 < top_p <= 1, got "
                         f"{temperature} and {top_p}")
    for i, prompt in enumerate(prompts):
        if prompt.ndim != 1 or prompt.numel() == 0:
            raise InputError(f"prompts[{i}]: expected a non-empty 1-D id tensor, got shape "
                             f"{tuple(prompt.shape)}")
    device = model.language_model.output_weight.device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    batch = len(prompts)
    max_len = int(lengths.max()) + max_new_tokens
    llm_config = model.config.llm
    if max_len > llm_config.max_position_embeddings:
        raise InputError(f"max_new_tokens: prompt ({int(lengths.max())} tokens) + {max_new_tokens} "
                         f"new tokens exceed max_position_embeddings {llm_config.max_position_embeddings}")
    dtype = model.language_model.output_weight.dtype
    if torch.is_autocast_enabled(device.type):
        dtype = torch.get_autocast_dtype(device.type)
    cache = KVCache(llm_config, batch, max_len, device, dtype)

    # Prefill: all prompts packed in one row, each writing its own cache row.
    ids_T = torch.cat([p.to(device) for p in prompts])
    cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    batch_index, positions = sample_positions(cu_seqlens, ids_T.numel())
    layout = PackedLayout(cu_seqlens, positions, int(lengths.max()), batch_index)
    last = (cu_seqlens[1:] - 1).long()        # each prompt's last token
    decoder_MD, memory_MD = model.image_rows(pixel_values, xattn)
    prefill_hooks = step_hooks = None
    if model.has_xattn:
        memory = model.memory_cache(memory_MD)
        # one range per prompt token, in the prompts' order (the packed order here)
        kv_start, kv_end = model.xattn_ranges(xattn, ids_T, token_packer(ids_T))
        prefill_hooks = model.xattn_hooks(memory, kv_start, kv_end)
        step_hooks = model.xattn_hooks(memory, kv_start[last], kv_end[last])
    h_BD = model.language_model(model.embed(ids_T, decoder_MD), layout, cache,
                                before_layer=prefill_hooks, output_rows=last)
    logits_BV = model.language_model.logits(h_BD)

    stops = torch.tensor(list(stop_token_ids), device=device, dtype=torch.long)
    out = torch.empty(batch, max_new_tokens, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    step_layout = PackedLayout(torch.arange(batch + 1, device=device, dtype=torch.int32),
                               lengths.clone(), 1, torch.arange(batch, device=device))
    steps_done = 0
    for step in range(max_new_tokens):
        next_B = sample_next(logits_BV, temperature, top_p, generator)
        out[:, step] = next_B
        steps_done = step + 1
        finished |= torch.isin(next_B, stops)
        if steps_done == max_new_tokens or (steps_done % stop_check_every == 0 and bool(finished.all())):
            break
        h_BD = model.embed(next_B, None)
        h_BD = model.language_model(h_BD, step_layout, cache, before_layer=step_hooks)
        logits_BV = model.language_model.logits(h_BD)
        step_layout.position_ids += 1

    results = []
    stop_set = set(int(s) for s in stop_token_ids)
    for row in out[:, :steps_done].tolist():
        end = next((i for i, token in enumerate(row) if token in stop_set), len(row))
        results.append(row[:end])
    return results


def chat(model, processor, image, question: str, **generate_kwargs) -> str:
    """Answer one question about one image (or None): build the prompt, generate, decode."""
    sample = processor.prompt(question, images=None if image is None else [image])
    device = model.language_model.output_weight.device
    batch = pack_samples([sample]).to(device)
    pixel_values = batch.pixel_values if sample.num_tiles else None
    generate_kwargs.setdefault("stop_token_ids", processor.tokenizer.eos_token_ids)
    (tokens,) = generate(model, [batch.input_ids], pixel_values, xattn=batch.xattn,
                         **generate_kwargs)
    return processor.tokenizer.decode(tokens)
