"""Per-query key ranges for gated cross-attention (NVLM-X / NVLM-H, docs/nvlm.md section 8).

Every X-attn mask in NVLM is one contiguous range of the packed memory per text token, so
`cross_attention` takes `(kv_start, kv_end)` instead of a dense mask. This module builds them on
the tensors' device with a few vectorized ops (no loop over tokens, no host sync), from a
description of the packed text and memory that the collator has anyway:

    text tokens (T)   sample_index  0 0 0 0 0 0 0 0 0 | 1 1 1 1 1 1 1
                      image_index  -1 0 0 0 0 0 0-1-1 |-1-1 1 1 1-1-1   (the image's span in the text)
                      tile_index   -1-1 0 0-1 1 1-1-1 |-1-1-1 2 2-1-1   (NVLM-X: tokens of tag k)
    memory (M)        memory_offsets  [0, 2Q, 3Q]     (image i is memory[offsets[i]:offsets[i+1]])
                      tile_offsets    [0, Q, 2Q, 3Q]  (tile g is memory[offsets[g]:offsets[g+1]])

Rules:
- NVLM-X (tile_index given): the tokens of tag k of an image see only that tile (the thumbnail tag
  only the thumbnail); every other token sees all tiles of the most recent image at or before it
  in its own sample; a token before its sample's first image sees nothing (an empty range).
- NVLM-H (no tile_index): a token sees the whole memory of the most recent image at or before it
  in its own sample (the interleaved tags and tiles); before any image, nothing.
"""

from __future__ import annotations

import torch


def cross_attention_ranges(sample_index: torch.Tensor, image_index: torch.Tensor,
                           memory_offsets: torch.Tensor, tile_index: torch.Tensor | None = None,
                           tile_offsets: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(kv_start, kv_end), int32 `(T,)`, for `cross_attention` over a packed memory.

    Args:
        sample_index: `(T,)` int, the sample of each packed text token, non-decreasing.
        image_index: `(T,)` int, the global index (0, 1, ... in packed order) of the image whose
            span in the text holds the token (`<Image>` ... `</Image>`), -1 elsewhere.
        memory_offsets: `(num_images + 1,)` int, image i's memory rows are
            [memory_offsets[i], memory_offsets[i + 1]).
        tile_index: NVLM-X only, `(T,)` int, the global tile index of the tile whose tag holds
            the token, -1 elsewhere.
        tile_offsets: NVLM-X only, `(num_tiles + 1,)` int, tile g's memory rows are
            [tile_offsets[g], tile_offsets[g + 1]).
    """
    _check(sample_index, image_index, memory_offsets, tile_index, tile_offsets)
    device = sample_index.device
    sample_index, image_index = sample_index.long(), image_index.long()
    memory_offsets = memory_offsets.long()
    num_images = memory_offsets.numel() - 1

    # The most recent image at or before each token (images are numbered in packed order, so a
    # running maximum finds it), kept only if it belongs to the token's own sample.
    latest = torch.cummax(image_index, dim=0).values if image_index.numel() else image_index
    image_sample = torch.full((max(num_images, 1),), -1, dtype=torch.long, device=device)
    in_image = image_index >= 0
    image_sample.scatter_(0, image_index[in_image], sample_index[in_image])
    seen = (latest >= 0) & (image_sample[latest.clamp(min=0)] == sample_index)

    image = latest.clamp(min=0)
    kv_start = torch.where(seen, memory_offsets[image], 0)
    kv_end = torch.where(seen, memory_offsets[(image + 1).clamp(max=num_images)], 0)
    if tile_index is not None:
        tile_index, tile_offsets = tile_index.long(), tile_offsets.long()
        is_tag = tile_index >= 0
        last_tile = tile_offsets.numel() - 1
        tile = tile_index.clamp(0, last_tile)
        kv_start = torch.where(is_tag, tile_offsets[tile], kv_start)
        kv_end = torch.where(is_tag, tile_offsets[(tile + 1).clamp(max=last_tile)], kv_end)
    return kv_start.int(), kv_end.int()


def _check(sample_index, image_index, memory_offsets, tile_index, tile_offsets) -> None:
    for name, t in (("sample_index", sample_index), ("image_index", image_index),
                    ("memory_offsets", memory_offsets)):
        if not isinstance(t, torch.Tensor) or t.ndim != 1 or t.is_floating_point():
            raise TypeError(f"{name}: expected a 1-D integer tensor, got {_describe(t)}")
    if image_index.shape != sample_index.shape:
        raise ValueError(f"image_index: expected sample_index's shape {tuple(sample_index.shape)}, "
                         f"got {tuple(image_index.shape)}")
    if memory_offsets.numel() < 1:
        raise ValueError("memory_offsets: expected num_images + 1 >= 1 entries, got 0")
    if (tile_index is None) != (tile_offsets is None):
        raise ValueError("tile_index and tile_offsets: give both (NVLM-X) or neither (NVLM-H)")
    if tile_index is not None:
        for name, t in (("tile_index", tile_index), ("tile_offsets", tile_offsets)):
            if not isinstance(t, torch.Tensor) or t.ndim != 1 or t.is_floating_point():
                raise TypeError(f"{name}: expected a 1-D integer tensor, got {_describe(t)}")
        if tile_index.shape != sample_index.shape:
            raise ValueError(f"tile_index: expected sample_index's shape "
                             f"{tuple(sample_index.shape)}, got {tuple(tile_index.shape)}")
    if sample_index.device.type != "cpu":
        return      # contents are the collator's to get right; checking them here would sync
    num_images = memory_offsets.numel() - 1
    if image_index.numel() and int(image_index.max()) >= num_images:
        raise ValueError(f"image_index: values must be < num_images = {num_images} "
                         f"(memory_offsets has {num_images + 1} entries), got {int(image_index.max())}")
    if bool((memory_offsets.diff() < 0).any()) or bool((sample_index.diff() < 0).any()):
        raise ValueError("memory_offsets and sample_index: expected non-decreasing values")
    if tile_index is not None and tile_index.numel() and int(tile_index.max()) >= tile_offsets.numel() - 1:
        raise ValueError(f"tile_index: values must be < num_tiles = {tile_offsets.numel() - 1}, "
                         f"got {int(tile_index.max())}")


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"a {t.ndim}-D {t.dtype} tensor"
    return type(t).__name__
