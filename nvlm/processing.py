"""Images and conversations -> model inputs: tiling, prompt layout, ChatML, labels, packing.

    processor = NVLMProcessor.from_config(NVLMConfig.from_preset("tiny"))
    sample = processor([{"from": "human", "value": "<image>\nWhat is shown?"},
                        {"from": "gpt", "value": "A cat."}], images=["cat.jpg"])
    batch = pack_samples([sample, other_sample])      # one packed row with cu_seqlens

Tiling follows NVLM.md section 2 (InternVL's dynamic high-resolution tiling), the NVLM-D prompt
layout section 6. Shapes: S is the tile side in pixels, N the number of tiles of all images,
T the number of tokens of a packed row, B the number of samples in it.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import re
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps

from nvlm.config import NVLMConfig
from nvlm.model import IGNORE_INDEX
from nvlm.tokenizer import IM_END, IM_START, Tokenizer, load_tokenizer

IMAGE_PLACEHOLDER = "<image>"        # where an image goes in the user text
DEFAULT_THUMBNAIL_TAG = "<tile_global_thumbnail>"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# 8192 x 8192 = 67,108,864 pixels: far above any photo or scanned page NVLM sees (a 448-px tile
# grid of 6 is 2688 px wide), below PIL's own decompression-bomb limit (~179 Mpx), and ~200 MB
# as RGB, so a crafted header cannot make a data-loader worker allocate gigabytes.
DEFAULT_MAX_PIXELS = 8192 * 8192

ImageSource = Union[str, Path, bytes, bytearray, memoryview, Image.Image]


# ---------------------------------------------------------------------------------------------
# Dynamic high-resolution tiling (NVLM.md section 2)
# ---------------------------------------------------------------------------------------------

# The order of equal-product grids that NVLM.md lists for max_tiles = 6. InternVL builds the
# candidates as a Python set and sorts it by product, so ties come out in CPython's set iteration
# order, which no simple rule describes; this table pins it. Grids with a larger product (only
# reachable when max_tiles > 6) follow by rows ascending. The order inside one product never
# changes find_grid's answer: two equal-product grids c1/r1 < c2/r2 that tie around a = W/H always
# have a grid of smaller product strictly between them ((1,1) across 1, (c2-1, r2) above 1), which
# the walk has already taken. Only the order by product matters, and that is fixed.
_NVLM_GRID_ORDER: tuple[tuple[int, int], ...] = (
    (1, 1), (1, 2), (2, 1), (3, 1), (1, 3), (4, 1), (1, 4), (2, 2), (1, 5), (5, 1),
    (6, 1), (2, 3), (1, 6), (3, 2),
)
_NVLM_GRID_RANK = {grid: rank for rank, grid in enumerate(_NVLM_GRID_ORDER)}


@functools.lru_cache(maxsize=None)
def candidate_grids(max_tiles: int = 6) -> tuple[tuple[int, int], ...]:
    """Every (cols, rows) with 1 <= cols * rows <= max_tiles, in the walk order of find_grid.

    Sorted by cols * rows; equal products in NVLM.md's order (products up to 6), else rows
    ascending. For max_tiles = 6 this is NVLM.md's list of 14.
    """
    _require_positive_int(max_tiles, "max_tiles")
    grids = [(cols, rows) for cols in range(1, max_tiles + 1)
             for rows in range(1, max_tiles // cols + 1)]
    return tuple(sorted(grids, key=lambda g: (g[0] * g[1], _NVLM_GRID_RANK.get(g, g[1]))))


def find_grid(width: int, height: int, tile_size: int = 448,
              max_tiles: int = 6) -> tuple[int, int]:
    """(cols, rows) of the tile grid for a width x height image (NVLM.md section 2, step 2).

    The grid whose cols/rows is closest to width/height; on an exact tie the later candidate
    wins only if the image has more than half the pixels of that grid
    (width * height > 0.5 * tile_size^2 * cols * rows). The arithmetic is InternVL's, in float,
    so exact ties fall where they fall in the released code.
    """
    _require_positive_int(width, "width")
    _require_positive_int(height, "height")
    _require_positive_int(tile_size, "tile_size")
    aspect_ratio = width / height
    area = width * height
    best_grid, best_diff = (1, 1), math.inf
    for cols, rows in candidate_grids(max_tiles):
        diff = abs(aspect_ratio - cols / rows)
        if diff < best_diff:
            best_grid, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * cols * rows:
            best_grid = (cols, rows)
    return best_grid


def dynamic_tiles(image: Image.Image, tile_size: int = 448, max_tiles: int = 6,
                  use_thumbnail: bool = True) -> list[Image.Image]:
    """Cut an RGB image into S x S tiles (NVLM.md section 2, steps 3-4).

    The image is resized (bicubic) to (S * cols, S * rows) and cut row-major: tile t is column
    t % cols, row t // cols. With more than one tile and use_thumbnail, the whole image squashed
    to S x S comes last. Returns 1 tile (1x1 grid) or cols * rows [+ 1] tiles.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"image: expected a PIL image (see load_image), got {type(image).__name__}")
    width, height = image.size
    cols, rows = find_grid(width, height, tile_size, max_tiles)
    resized = image.resize((tile_size * cols, tile_size * rows), Image.Resampling.BICUBIC)
    tiles = []
    for t in range(cols * rows):
        left, top = (t % cols) * tile_size, (t // cols) * tile_size
        tiles.append(resized.crop((left, top, left + tile_size, top + tile_size)))
    if _has_thumbnail_tile(cols * rows, use_thumbnail):
        # From the original image, not from the resized one: one resampling only.
        tiles.append(image.resize((tile_size, tile_size), Image.Resampling.BICUBIC))
    return tiles


def tile_boxes(width: int, height: int, tile_size: int = 448, max_tiles: int = 6,
               use_thumbnail: bool = True) -> list[tuple[float, float, float, float]]:
    """The region (left, top, right, bottom) of the original image each tile of dynamic_tiles
    shows, in that image's pixel coordinates; the thumbnail's region is the whole image."""
    cols, rows = find_grid(width, height, tile_size, max_tiles)
    tile_w, tile_h = width / cols, height / rows
    boxes = [((t % cols) * tile_w, (t // cols) * tile_h,
              (t % cols + 1) * tile_w, (t // cols + 1) * tile_h) for t in range(cols * rows)]
    if _has_thumbnail_tile(cols * rows, use_thumbnail):
        boxes.append((0.0, 0.0, float(width), float(height)))
    return boxes


def _has_thumbnail_tile(num_grid_tiles: int, use_thumbnail: bool) -> bool:
    # A 1x1 grid already is the whole image: no second copy of it.
    return use_thumbnail and num_grid_tiles > 1


def tile_tags(num_tiles: int, thumbnail_tag: str = DEFAULT_THUMBNAIL_TAG,
              has_thumbnail: bool = True) -> list[str]:
    """The 1-D tile tags of NVLM.md section 6, one per tile of an image.

    With a thumbnail: `<tile_1>` ... `<tile_{n-1}>` and the thumbnail tag last (a one-tile image
    gets only the thumbnail tag: its tile is the whole image). Without: `<tile_1>` ... `<tile_n>`.
    """
    _require_positive_int(num_tiles, "num_tiles")
    if has_thumbnail:
        return [f"<tile_{k}>" for k in range(1, num_tiles)] + [thumbnail_tag]
    return [f"<tile_{k}>" for k in range(1, num_tiles + 1)]


# ---------------------------------------------------------------------------------------------
# Image loading and normalization
# ---------------------------------------------------------------------------------------------

def load_image(source: ImageSource, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """A path, encoded bytes or a PIL image -> a fully decoded RGB PIL image.

    EXIF orientation is applied. Alpha (RGBA, LA, PA, palette or colour-key transparency) is
    composited onto white; grayscale, palette, CMYK, YCbCr... are converted to RGB; 16-bit
    images keep their high byte. Encoded sources are checked against `max_pixels` (width *
    height, None for no limit) from the header, before anything is decoded.

    Raises ValueError naming the source for undecodable, truncated, too large or zero-sized
    images, FileNotFoundError for a missing path, TypeError for other source types.
    """
    if isinstance(source, Image.Image):
        return _decoded_rgb(source, "<PIL image>", max_pixels=None)
    if isinstance(source, (str, Path)):
        name = str(source)
        if not Path(source).is_file():
            raise FileNotFoundError(f"image file {name!r} does not exist")
        data = Path(source).read_bytes()
    elif isinstance(source, (bytes, bytearray, memoryview)):
        name, data = "<image bytes>", bytes(source)
    else:
        raise TypeError(f"image: expected a path, bytes or a PIL image, "
                        f"got {type(source).__name__}")
    try:
        with warnings.catch_warnings():
            # max_pixels is our bomb check; PIL's own warning would only repeat it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise ValueError(f"image {name!r}: {err} (PIL's Image.MAX_IMAGE_PIXELS)") from err
    except _DECODE_ERRORS as err:
        raise _decode_error(name, err) from err
    return _decoded_rgb(image, name, max_pixels)


# What PIL's decoders raise on bad data, depending on the format and where the data breaks.
_DECODE_ERRORS = (OSError, SyntaxError, EOFError, struct.error, zlib.error)


def _decode_error(name: str, err: BaseException) -> ValueError:
    # PIL's message for unrecognised data names an anonymous BytesIO: say it in words instead.
    detail = ("no image format recognised" if isinstance(err, Image.UnidentifiedImageError)
              else f"{type(err).__name__}: {err}")
    return ValueError(f"image {name!r}: cannot decode it, the file is corrupt, truncated or not "
                      f"an image ({detail})")


def _decoded_rgb(image: Image.Image, name: str, max_pixels: int | None) -> Image.Image:
    _check_size(image.size, name, max_pixels)
    try:
        # PIL decodes lazily: load() now, so that truncated data fails here and not later in a
        # resize. LOAD_TRUNCATED_IMAGES stays off, so truncation raises instead of padding.
        image.load()
        return _to_rgb(ImageOps.exif_transpose(image))
    except _DECODE_ERRORS as err:
        raise _decode_error(name, err) from err


def _check_size(size: tuple[int, int], name: str, max_pixels: int | None) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ValueError(f"image {name!r}: expected a non-empty image, got size {width}x{height}")
    if max_pixels is not None and width * height > max_pixels:
        raise ValueError(
            f"image {name!r}: {width}x{height} = {width * height} pixels exceeds max_pixels="
            f"{max_pixels}; pass a larger max_pixels to load_image (or None for no limit) if "
            "this image is trusted")


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        # PIL's convert clips 16-bit values to 0..255 (almost everything turns white); keep the
        # high byte instead. Mode "I" is how PIL opens 16-bit grayscale from some formats.
        pixels = np.asarray(image).astype(np.int64)
        image = Image.fromarray((np.clip(pixels, 0, 65535) >> 8).astype(np.uint8), mode="L")
        mode = "L"
    if mode == "P" and "transparency" not in image.info:
        return image.convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info
    if has_alpha:
        # PIL has no direct path from premultiplied La to RGBA.
        rgba = (image.convert("LA") if mode == "La" else image).convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def image_to_tensor(tiles: Sequence[Image.Image]) -> torch.Tensor:
    """RGB tiles -> (N, 3, S, S) float32, scaled to [0, 1] and ImageNet-normalized.

    Same arithmetic as torchvision's ToTensor + Normalize: x / 255, then (x - mean) / std.
    """
    if len(tiles) == 0:
        raise ValueError("tiles: expected at least one tile, got none")
    sizes = {tile.size for tile in tiles}
    if len(sizes) != 1 or next(iter(sizes))[0] != next(iter(sizes))[1]:
        raise ValueError(f"tiles: expected square tiles of one size, got sizes {sorted(sizes)}")
    modes = {tile.mode for tile in tiles}
    if modes != {"RGB"}:
        raise ValueError(f"tiles: expected RGB tiles (see load_image), got modes {sorted(modes)}")
    pixels = np.stack([np.asarray(tile, dtype=np.uint8) for tile in tiles])   # (N, S, S, 3)
    # Channels first while still uint8: the float ops then run in place on a contiguous tensor
    # (7 tiles of 448 px: 45 ms instead of 72 ms on the 2-core CI machine).
    x = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))).float().div_(255)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)


# ---------------------------------------------------------------------------------------------
# Prompt layout and ChatML (NVLM.md section 6)
# ---------------------------------------------------------------------------------------------

def image_prompt(num_tiles: int, tokens_per_tile: int, image_token: str,
                 thumbnail_tag: str = DEFAULT_THUMBNAIL_TAG, has_thumbnail: bool = True) -> str:
    """The NVLM-D text that replaces one `<image>`:

        <Image><tile_1>{image_token x tokens_per_tile}...<tile_global_thumbnail>{...}</Image>

    No separators: the released NVLM-D code concatenates exactly like this.
    """
    _require_positive_int(tokens_per_tile, "tokens_per_tile")
    if not image_token:
        raise ValueError(f"image_token: expected a non-empty string, got {image_token!r}")
    tiles = "".join(tag + image_token * tokens_per_tile
                    for tag in tile_tags(num_tiles, thumbnail_tag, has_thumbnail))
    return f"<Image>{tiles}</Image>"


_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
          "system": "system"}


def normalize_conversation(conversation: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """Turns as (role, text) with role in user / assistant / system.

    Accepts LLaVA/InternVL turns `{"from": "human"|"gpt"|"system", "value": ...}` and OpenAI-style
    `{"role": "user"|"assistant"|"system", "content": ...}`.
    """
    if isinstance(conversation, (str, bytes)) or not isinstance(conversation, Sequence):
        raise TypeError(f"conversation: expected a list of turns (dicts), "
                        f"got {type(conversation).__name__}")
    turns = []
    for i, turn in enumerate(conversation):
        if not isinstance(turn, Mapping):
            raise TypeError(f"conversation[{i}]: expected a dict, got {type(turn).__name__}")
        role = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        if role not in _ROLES:
            raise ValueError(f"conversation[{i}]: expected 'from' in human/gpt/system or 'role' "
                             f"in user/assistant/system, got {role!r}")
        if not isinstance(text, str):
            raise TypeError(f"conversation[{i}]: expected the text ('value' or 'content') to be "
                            f"a str, got {type(text).__name__}")
        turns.append((_ROLES[role], text))
    return turns


def chatml_header(role: str) -> str:
    return f"{IM_START}{role}\n"


def chatml(turns: Iterable[tuple[str, str]], add_generation_prompt: bool = False) -> str:
    """`<|im_start|>{role}\\n{text}<|im_end|>\\n` per turn, then `<|im_start|>assistant\\n` when
    add_generation_prompt."""
    text = "".join(f"{chatml_header(role)}{body}{IM_END}\n" for role, body in turns)
    return text + (chatml_header("assistant") if add_generation_prompt else "")


# ---------------------------------------------------------------------------------------------
# The processor
# ---------------------------------------------------------------------------------------------

@dataclass
class ProcessedSample:
    """One conversation as model inputs (S: tile side, L: tokens, N: tiles of all its images)."""

    input_ids: torch.Tensor      # (L,) int64
    labels: torch.Tensor         # (L,) int64; IGNORE_INDEX except assistant answers + <|im_end|>
    pixel_values: torch.Tensor   # (N, 3, S, S) float32, N = sum(num_tiles); (0, 3, S, S) if none
    num_tiles: list[int]         # per image, in placeholder order
    num_image_tokens: int        # placeholders in input_ids = N * tokens_per_tile

    def __len__(self) -> int:
        return self.input_ids.numel()


# The text that stands for an image in the LLM sequence, per architecture. NVLM-X (tags in the
# text, tiles in the cross-attention memory) and NVLM-H (thumbnail in the decoder, regular tiles
# in the memory) add their layouts here, together with the memory description the collator needs.
_IMAGE_LAYOUTS: dict[str, Callable[..., str]] = {"D": image_prompt}


class NVLMProcessor:
    """Tokenizes conversations with images into a ProcessedSample (NVLM.md sections 2 and 6).

    Tile size, max tiles, thumbnail, thumbnail tag and tokens per tile come from the config.
    `max_tiles` may be overridden per call (pretraining uses 1: one 1x1 tile, no thumbnail).
    """

    def __init__(self, tokenizer: Tokenizer, config: NVLMConfig) -> None:
        if config.arch not in _IMAGE_LAYOUTS:
            raise NotImplementedError(
                f"NVLMProcessor: arch {config.arch!r} has no prompt layout yet; only "
                f"{sorted(_IMAGE_LAYOUTS)} (NVLM-D) are implemented")
        if tokenizer.image_token_id != config.image_token_id:
            raise ValueError(
                f"tokenizer.image_token_id: expected config.image_token_id "
                f"{config.image_token_id}, got {tokenizer.image_token_id} "
                f"({tokenizer.image_token!r}); the model would put image rows on the wrong ids")
        if tokenizer.vocab_size > config.llm.vocab_size:
            raise ValueError(f"tokenizer.vocab_size: expected at most config.llm.vocab_size "
                             f"{config.llm.vocab_size}, got {tokenizer.vocab_size}")
        self.tokenizer = tokenizer
        self.config = config
        self._image_layout = _IMAGE_LAYOUTS[config.arch]

    @classmethod
    def from_config(cls, config: NVLMConfig, tokenizer: Tokenizer | None = None) -> "NVLMProcessor":
        """With the built-in ByteTokenizer when no tokenizer is given (the tiny preset)."""
        return cls(tokenizer if tokenizer is not None else load_tokenizer(), config)

    @property
    def tile_size(self) -> int:
        return self.config.tile_size

    @property
    def tokens_per_tile(self) -> int:
        return self.config.tokens_per_tile

    def image_text(self, num_tiles: int) -> str:
        """What one `<image>` with `num_tiles` tiles becomes in the text."""
        # A lone tile is the whole image, so it is tagged as the thumbnail even when
        # use_thumbnail is off (the released code tags every last tile that way).
        has_thumbnail = self.config.use_thumbnail or num_tiles == 1
        return self._image_layout(num_tiles, self.tokens_per_tile, self.tokenizer.image_token,
                                  thumbnail_tag=self.config.thumbnail_tag,
                                  has_thumbnail=has_thumbnail)

    def __call__(self, conversations: Sequence[Mapping[str, Any]],
                 images: ImageSource | Sequence[ImageSource] | None = None,
                 max_tiles: int | None = None) -> ProcessedSample:
        """A training sample from one conversation (a list of turns, see normalize_conversation).

        Each `<image>` in the user turns is replaced, in order, by the next image's tiles (its
        prompt layout); with images but no `<image>` at all, `<image>\n` is prepended to the
        first user turn. Placeholders and images must then match one to one (ValueError with
        both counts otherwise), and the image token itself may not appear as text. Labels are
        IGNORE_INDEX except on the assistant answers and their closing `<|im_end|>`; a
        conversation without an assistant turn has no labelled token.
        """
        return self._build(normalize_conversation(conversations), images, max_tiles,
                           add_generation_prompt=False)

    def prompt(self, question: str, images: ImageSource | Sequence[ImageSource] | None = None,
               max_tiles: int | None = None, system: str | None = None) -> ProcessedSample:
        """A generation prompt: [system turn,] the user turn, then `<|im_start|>assistant\\n`."""
        if not isinstance(question, str):
            raise TypeError(f"question: expected str, got {type(question).__name__}")
        turns = ([("system", system)] if system is not None else []) + [("user", question)]
        return self._build(turns, images, max_tiles, add_generation_prompt=True)

    def _build(self, turns: list[tuple[str, str]],
               images: ImageSource | Sequence[ImageSource] | None, max_tiles: int | None,
               add_generation_prompt: bool) -> ProcessedSample:
        images = _as_image_list(images)
        max_tiles = self.config.max_tiles if max_tiles is None else max_tiles
        _require_positive_int(max_tiles, "max_tiles")
        image_token = self.tokenizer.image_token
        for i, (_, text) in enumerate(turns):
            if image_token in text:
                raise ValueError(
                    f"conversation[{i}]: contains the image token {image_token!r} as text; it "
                    f"is reserved for image rows (write {IMAGE_PLACEHOLDER!r} where an image goes)")

        num_placeholders = sum(text.count(IMAGE_PLACEHOLDER) for role, text in turns
                               if role == "user")
        if images and num_placeholders == 0:
            first_user = next((i for i, (role, _) in enumerate(turns) if role == "user"), None)
            if first_user is None:
                raise ValueError(f"conversation: {len(images)} image(s) given but there is no "
                                 "user turn to put them in")
            turns = list(turns)
            turns[first_user] = ("user", f"{IMAGE_PLACEHOLDER}\n{turns[first_user][1]}")
            num_placeholders = 1
        if num_placeholders != len(images):
            raise ValueError(f"conversation: {num_placeholders} {IMAGE_PLACEHOLDER!r} "
                             f"placeholder(s) in the user turns but {len(images)} image(s) given; "
                             "they must match one to one")

        tiles: list[Image.Image] = []
        num_tiles: list[int] = []
        for image in images:
            image_tiles = dynamic_tiles(load_image(image), self.tile_size, max_tiles,
                                        self.config.use_thumbnail)
            tiles.extend(image_tiles)
            num_tiles.append(len(image_tiles))

        image_texts = iter([self.image_text(n) for n in num_tiles])
        ids: list[int] = []
        labels: list[int] = []
        for role, text in turns:
            if role == "user":
                text = re.sub(re.escape(IMAGE_PLACEHOLDER), lambda _: next(image_texts), text)
            self._append_turn(role, text, ids, labels)
        if add_generation_prompt:
            header = self.tokenizer.encode(chatml_header("assistant"))
            ids.extend(header)
            labels.extend([IGNORE_INDEX] * len(header))

        input_ids = torch.tensor(ids, dtype=torch.int64)
        expected = sum(num_tiles) * self.tokens_per_tile
        found = int((input_ids == self.tokenizer.image_token_id).sum())
        if found != expected:
            # Only a tokenizer that splits or merges the image token can get here.
            raise ValueError(f"input_ids: expected {expected} image tokens (tiles {num_tiles} x "
                             f"{self.tokens_per_tile} per tile), found {found}")
        if tiles:
            pixel_values = image_to_tensor(tiles)
        else:
            pixel_values = torch.empty(0, 3, self.tile_size, self.tile_size, dtype=torch.float32)
        return ProcessedSample(input_ids=input_ids,
                               labels=torch.tensor(labels, dtype=torch.int64),
                               pixel_values=pixel_values, num_tiles=num_tiles,
                               num_image_tokens=expected)

    def _append_turn(self, role: str, text: str, ids: list[int], labels: list[int]) -> None:
        # Header, body and the closing newline are encoded separately: the model generates an
        # answer from right after `<|im_start|>assistant\n`, so training sees the answer's tokens
        # exactly as generation produces them (no BPE merge across the header), and the
        # label boundaries are exact token boundaries.
        header = self.tokenizer.encode(chatml_header(role))
        body = self.tokenizer.encode(text + IM_END)
        newline = self.tokenizer.encode("\n")
        ids.extend(header + body + newline)
        body_labels = body if role == "assistant" else [IGNORE_INDEX] * len(body)
        labels.extend([IGNORE_INDEX] * len(header) + body_labels + [IGNORE_INDEX] * len(newline))


def _as_image_list(images: ImageSource | Sequence[ImageSource] | None) -> list[ImageSource]:
    if images is None:
        return []
    if isinstance(images, (str, Path, bytes, bytearray, memoryview, Image.Image)):
        return [images]
    if not isinstance(images, Sequence):
        raise TypeError(f"images: expected None, an image or a list of images, "
                        f"got {type(images).__name__}")
    return list(images)


# ---------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------

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

    def __len__(self) -> int:
        return self.input_ids.numel()

    @property
    def num_samples(self) -> int:
        return self.cu_seqlens.numel() - 1

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PackedBatch":
        return dataclasses.replace(
            self, **{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                     for f in dataclasses.fields(self)
                     if isinstance(getattr(self, f.name), torch.Tensor)})


def pack_samples(samples: Sequence[ProcessedSample]) -> PackedBatch:
    """Concatenate samples, in order, into one PackedBatch (no truncation, no reordering)."""
    if len(samples) == 0:
        raise ValueError("samples: expected at least one sample, got none")
    tile_shapes = {tuple(s.pixel_values.shape[1:]) for s in samples}
    if len(tile_shapes) != 1:
        raise ValueError(f"samples: expected one tile shape (3, S, S) for all samples, "
                         f"got {sorted(tile_shapes)}")
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
    )


def _require_positive_int(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected a positive int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value}")
