"""Exact-match evaluation by generation: the trainer's final eval and the demo's figures."""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image

from .data import EvalItem
from .errors import InputError
from .generate import generate
from .images import load_image
from .packing import pack_samples
from .processing import NVLMProcessor


def exact_match(model, processor: NVLMProcessor, items: Sequence[EvalItem], *, blank: bool = False,
                max_tiles: int | None = None, batch_size: int = 50, max_new_tokens: int = 12,
                device: torch.device | str = "cpu") -> float:
    """Share of items whose greedy answer equals the reference (whitespace-trimmed).

    blank=True replaces every image by a white one of the same size (same tiles, same prompt
    length), so the score shows what the model answers without seeing the image's content.
    """
    if not items:
        raise InputError("items: expected at least one eval item, got none")
    tokenizer = processor.tokenizer
    correct = 0
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        samples = []
        for item in chunk:
            images = [load_image(p) for p in item.images]
            if blank:
                images = [Image.new("RGB", im.size, (255, 255, 255)) for im in images]
            samples.append(processor.prompt(item.question, images or None, max_tiles=max_tiles))
        batch = pack_samples(samples).to(device)
        pixel_values = batch.pixel_values if len(batch.pixel_values) else None
        answers = generate(model, [s.input_ids for s in samples], pixel_values, xattn=batch.xattn,
                           max_new_tokens=max_new_tokens, stop_token_ids=tokenizer.eos_token_ids)
        for item, tokens in zip(chunk, answers):
            correct += tokenizer.decode(tokens).strip() == item.answer.strip()
    return correct / len(items)
