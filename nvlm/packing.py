"""The packed-batch contract: how samples become one packed row, and what every layer reads.

Samples are concatenated flash-attention style (no padding): `cu_seqlens` holds the offsets,
`position_ids` restart at 0 for each sample. The processor builds ProcessedSamples, pack_samples
concatenates them into a PackedBatch, the model turns that into a PackedLayout for its attention
and RoPE, and the loss reads `next_token_targets`. NVLM-X/H add XAttnInputs: which tiles fill the
decoder's placeholders, which make up the cross-attention memory, and the memory range each token
sees. A leaf module: it imports nothing from nvlm, so data, processing, model and generation can
all build on it.

Shapes: T tokens of a packed row, B samples in it, N tiles, S tile side, L tokens of one sample.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

import nvlm_kernels
from .errors import InputError

IGNORE_INDEX = -100   # the label of a token that is not a training target (PyTorch's default)


@dataclass
class PackedLayout:
    """Where each token of a packed batch belongs: what the attention and RoPE need.

    cu_seqlens (B + 1,) int32 offsets of the samples; position_ids (T,) position of each token within
    its sample; max_seqlen the longest sample. With a KV cache, batch_index (T,) names each token's
    cache row (its sample) and position_ids its slot.
    """

    cu_seqlens: torch.Tensor
    position_ids: torch.Tensor
    max_seqlen: int
    batch_index: torch.Tensor | None = None

    def causal_key_ranges(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(kv_start, kv_end) int32 of the packed positions `rows` in causal self-attention over
        the pack: each sees its own sample's tokens up to and including itself."""
        cu = self.cu_seqlens
        sample = torch.searchsorted(cu, rows.to(cu.dtype), right=True) - 1  # empty samples skipped
        return cu[sample], (rows + 1).to(torch.int32)


def sample_positions(cu_seqlens: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sample index, position within the sample) of every token of a pack, both (total,) int64."""
    lengths = cu_seqlens.diff()
    sample_index = torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device),
                                           lengths, output_size=total)
    positions = torch.arange(total, device=cu_seqlens.device) - cu_seqlens[sample_index]
    return sample_index, positions


def next_token_targets(labels_T: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """The target of each packed position: the label of the next token of the same sample;
    IGNORE_INDEX at every sample's last token (nothing follows it within the sample)."""
    targets_T = torch.full_like(labels_T, IGNORE_INDEX)
    targets_T[:-1] = labels_T[1:]
    lengths = cu_seqlens.diff()
    last = (cu_seqlens[1:] - 1)[lengths > 0].long()
    targets_T[last] = IGNORE_INDEX
    return targets_T


def token_packer(input_ids: torch.Tensor, scatter_back: torch.Tensor | None = None
                 ) -> Callable[[torch.Tensor, str], torch.Tensor]:
    """pack(t, name): a per-token tensor of input_ids' shape (labels, X-attn ranges) in input_ids'
    packed order, on its device: flattened, or only the positions `scatter_back` keeps (the mask
    of the non-padding positions of (B, L) rows). Another shape is refused, naming `name`."""
    def pack(t: torch.Tensor, name: str) -> torch.Tensor:
        if t.shape != input_ids.shape:
            raise InputError(f"{name}: expected input_ids' shape {tuple(input_ids.shape)}, "
                             f"got {tuple(t.shape)}")
        t = t.to(input_ids.device)
        return t.reshape(-1) if scatter_back is None else t[scatter_back]

    return pack


@dataclass
class XAttnInputs:
    """What NVLM-X/H need besides the token ids: where each tile's image rows go and which memory
    rows each text token sees. Built by the processor (`pack_samples`), on the tokens' device.

    decoder_tiles: (N_d,) int64, the tiles whose rows fill the decoder's image placeholders, in
        order (NVLM-H: each image's thumbnail; NVLM-X: none).
    memory_tiles: (N_m,) int64, the tiles whose rows make up the X-attn memory, in memory order
        (NVLM-X: every tile; NVLM-H: the regular tiles).
    memory_ids: NVLM-H only, (M,) ids of the memory: per regular tile the ids of its tag
        `<tile_k>` then one image placeholder per image row (filled like the decoder's, through
        `multimodal_embed`); None for NVLM-X, whose memory is the tile rows alone.
    kv_start, kv_end: int32, input_ids' shape: token i sees memory rows [kv_start, kv_end)
        (nvlm_kernels.cross_attention_ranges).
    """

    decoder_tiles: torch.Tensor
    memory_tiles: torch.Tensor
    memory_ids: torch.Tensor | None
    kv_start: torch.Tensor
    kv_end: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "XAttnInputs":
        return dataclasses.replace(self, **{
            f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in dataclasses.fields(self) if getattr(self, f.name) is not None})


@dataclass
class XAttnSample:
    """NVLM-X/H: one sample's images as the X-attn needs them (indices local to the sample;
    pack_samples offsets them and turns them into XAttnInputs)."""

    image_index: torch.Tensor    # (L,) int64: the image whose span holds the token, else -1
    tile_index: torch.Tensor | None  # NVLM-X (L,) int64: the tile whose tag holds it, else -1
    decoder_tiles: list[int]     # tiles whose rows fill the decoder placeholders, in order
    memory_tiles: list[int]      # tiles of the memory, in memory order
    memory_ids: torch.Tensor | None  # NVLM-H (M,) int64: tag ids + placeholders; X: None
    memory_sizes: list[int]      # memory rows per image
    tokens_per_tile: int         # image rows per tile


@dataclass
class ProcessedSample:
    """One conversation as model inputs (S: tile side, L: tokens, N: tiles of all its images)."""

    input_ids: torch.Tensor      # (L,) int64
    labels: torch.Tensor         # (L,) int64; IGNORE_INDEX except assistant answers + <|im_end|>
    pixel_values: torch.Tensor   # (N, 3, S, S) float32, N = sum(num_tiles); (0, 3, S, S) if none
    num_tiles: list[int]         # per image, in placeholder order
    num_image_tokens: int        # placeholders in input_ids (NVLM-D: N * tokens_per_tile)
    xattn: XAttnSample | None = None   # NVLM-X/H only

    def __len__(self) -> int:
        return self.input_ids.numel()


@dataclass
class PackedBatch:
    """Samples concatenated into one row (T tokens, B samples, N tiles), flash-attention style."""

    input_ids: torch.Tensor      # (T,) int64
    labels: torch.Tensor         # (T,) int64
    position_ids: torch.Tensor   # (T,) int64, restarting at 0 for each sample
    cu_seqlens: torch.Tensor     # (B + 1,) int32; sample b: tokens cu_seqlens[b] : cu_seqlens[b+1]
    max_seqlen: int
    pixel_values: torch.Tensor   # (N, 3, S, S) float32, the samples' tiles in order
    num_tiles: list[int]         # per image, all samples' images in order
    xattn: XAttnInputs | None = None   # NVLM-X/H: tile routing and each token's memory range

    def __len__(self) -> int:
        return self.input_ids.numel()

    @property
    def num_samples(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def num_targets(self) -> int:
        """Positions with a next-token target: what the model's mean loss covers (the trainer's
        normaliser, counted on the host before the batch moves to the device)."""
        return int((next_token_targets(self.labels, self.cu_seqlens) != IGNORE_INDEX).sum())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PackedBatch":
        return dataclasses.replace(
            self, **{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                     for f in dataclasses.fields(self)
                     if isinstance(getattr(self, f.name), (torch.Tensor, XAttnInputs))})


def pack_samples(samples: Sequence[ProcessedSample]) -> PackedBatch:
    """Concatenate samples, in order, into one PackedBatch (no truncation, no reordering)."""
    if len(samples) == 0:
        raise InputError("samples: expected at least one sample, got none")
    tile_shapes = {tuple(s.pixel_values.shape[1:]) for s in samples}
    if len(tile_shapes) != 1:
        raise InputError(f"samples: expected one tile shape (3, S, S) for all samples, "
                         f"got {sorted(tile_shapes)}")
    with_xattn = {s.xattn is not None for s in samples}
    if len(with_xattn) != 1:
        raise InputError("samples: expected all from one architecture, got NVLM-D samples (no "
                         "X-attn inputs) mixed with NVLM-X/H ones")
    lengths = [len(s) for s in samples]
    cu_seqlens = torch.zeros(len(samples) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0).to(torch.int32)
    return PackedBatch(
        input_ids=torch.cat([s.input_ids for s in samples]),
        labels=torch.cat([s.labels for s in samples]),
        position_ids=torch.cat([torch.arange(n, dtype=torch.int64) for n in lengths]),
        cu_seqlens=cu_seqlens,
        max_seqlen=max(lengths),
        pixel_values=torch.cat([s.pixel_values for s in samples]),
        num_tiles=[n for s in samples for n in s.num_tiles],
        xattn=_pack_xattn(samples, cu_seqlens) if with_xattn == {True} else None,
    )


def _pack_xattn(samples: Sequence[ProcessedSample], cu_seqlens: torch.Tensor) -> XAttnInputs:
    """The samples' X-attn descriptions in packed (global) indices, and every token's memory
    range from nvlm_kernels.cross_attention_ranges."""
    tiles_before = np.cumsum([0] + [sum(s.num_tiles) for s in samples]).tolist()
    images_before = np.cumsum([0] + [len(s.num_tiles) for s in samples]).tolist()

    def shifted(index: torch.Tensor, by: int) -> torch.Tensor:
        return torch.where(index >= 0, index + by, index)

    parts = [s.xattn for s in samples]
    sample_index, _ = sample_positions(cu_seqlens, int(cu_seqlens[-1]))
    image_index = torch.cat([shifted(x.image_index, b) for x, b in zip(parts, images_before)])
    memory_sizes = torch.tensor([n for x in parts for n in x.memory_sizes], dtype=torch.int64)
    memory_offsets = F.pad(memory_sizes.cumsum(0), (1, 0))
    tiles = lambda name: torch.tensor(  # noqa: E731
        [t + b for x, b in zip(parts, tiles_before) for t in getattr(x, name)], dtype=torch.int64)
    ranges = {}
    if parts[0].tile_index is not None:   # NVLM-X: the memory is every tile, in tile order
        ranges["tile_index"] = torch.cat([shifted(x.tile_index, b)
                                          for x, b in zip(parts, tiles_before)])
        ranges["tile_offsets"] = torch.arange(tiles_before[-1] + 1) * parts[0].tokens_per_tile
    kv_start, kv_end = nvlm_kernels.cross_attention_ranges(sample_index, image_index,
                                                           memory_offsets, **ranges)
    memory_ids = None
    if parts[0].memory_ids is not None:   # NVLM-H
        memory_ids = torch.cat([x.memory_ids for x in parts])
    return XAttnInputs(decoder_tiles=tiles("decoder_tiles"), memory_tiles=tiles("memory_tiles"),
                       memory_ids=memory_ids, kv_start=kv_start, kv_end=kv_end)
