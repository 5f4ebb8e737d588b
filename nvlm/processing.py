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

import contextlib
import dataclasses
import functools
import io
import math
import os
import re
import stat
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator, Mapping, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

import nvlm_kernels
from nvlm.config import MAX_TILES_LIMIT, NVLMConfig, check_max_tiles
from nvlm.llm import sample_positions
from nvlm.model import IGNORE_INDEX
from nvlm.xattn import XAttnInputs
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


class ImageError(ValueError):
    """An image that cannot be used: undecodable, truncated, too large, empty or not a regular
    file. A missing path or a directory raise FileNotFoundError / IsADirectoryError instead."""


class SampleTooLong(ValueError):
    """A sample that needs more tokens than the budget (`max_len`) it was built for."""


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


def candidate_grids(max_tiles: int = 6) -> tuple[tuple[int, int], ...]:
    """Every (cols, rows) with 1 <= cols * rows <= max_tiles, in the walk order of find_grid.

    Sorted by cols * rows; equal products in NVLM.md's order (products up to 6), else rows
    ascending. For max_tiles = 6 this is NVLM.md's list of 14. max_tiles is at most
    MAX_TILES_LIMIT (280 grids for 64).
    """
    return _candidate_grids(check_max_tiles(max_tiles))


@functools.lru_cache(maxsize=MAX_TILES_LIMIT)
def _candidate_grids(max_tiles: int) -> tuple[tuple[int, int], ...]:
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
    height, None for no limit) from the header, before anything is decoded. A file is read as
    the decoder asks for it, never whole into memory first.

    Raises ImageError (a ValueError) naming the source for undecodable, truncated, too large or
    zero-sized images and for paths that are not regular files (a device, a pipe);
    FileNotFoundError for a missing path, IsADirectoryError for a directory, TypeError for other
    source types.
    """
    if isinstance(source, Image.Image):
        _check_size(source.size, "<PIL image>", max_pixels=None)
        return _decoded_rgb(source, "<PIL image>")
    with _opened_image(source, max_pixels) as (image, name):
        return _decoded_rgb(image, name)


def image_size(source: ImageSource, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) of an image as stored, from its header alone (nothing is decoded; EXIF
    orientation, which may swap the two, is not applied); the same checks and errors as
    load_image short of decoding."""
    if isinstance(source, Image.Image):
        _check_size(source.size, "<PIL image>", max_pixels=None)
        return source.size
    with _opened_image(source, max_pixels) as (image, _name):
        return image.size


def regular_file_problem(path: str | Path) -> str | None:
    """Why `path` is not a regular file, in words ("does not exist", "is a directory", "is not a
    regular file (a character device)"), or None if it is one. Symlinks are followed; nothing
    is opened (opening a named pipe blocks, a device may never end)."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "does not exist"
    except OSError as err:
        return f"cannot be read ({err.strerror})"
    except ValueError:
        return "is not a valid path (it holds a NUL byte)"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a directory"
    kinds = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"))
    kind = next((name for test, name in kinds if test(mode)), "not a file")
    return f"is not a regular file ({kind})"


def open_regular_file(path: str | Path, what: str = "file") -> BinaryIO:
    """`path` opened for binary reading if it is a regular file. Else FileNotFoundError,
    IsADirectoryError or ImageError, each saying "{what} '{path}' ..." and why."""
    problem = regular_file_problem(path)
    if problem is not None:
        message = f"{what} {str(path)!r} {problem}"
        if problem == "does not exist":
            raise FileNotFoundError(message)
        raise IsADirectoryError(message) if problem == "is a directory" else ImageError(message)
    return open(path, "rb")  # noqa: SIM115 - the caller closes it


@contextlib.contextmanager
def _opened_image(source: ImageSource, max_pixels: int | None
                  ) -> Iterator[tuple[Image.Image, str]]:
    """An encoded source opened by PIL from its header (pixels not decoded yet: PIL reads them
    from the file on load()) with its size checked, and its name for messages; a file is
    closed when the block ends."""
    if isinstance(source, (str, Path)):
        name, file = str(source), open_regular_file(source, "image file")
    elif isinstance(source, (bytes, bytearray, memoryview)):
        name, file = "<image bytes>", io.BytesIO(source)
    else:
        raise TypeError(f"image: expected a path, bytes or a PIL image, "
                        f"got {type(source).__name__}")
    with file:
        try:
            with warnings.catch_warnings():
                # max_pixels is our bomb check; PIL's own warning would only repeat it.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(file)
        except Image.DecompressionBombError as err:
            raise ImageError(f"image {name!r}: {err} (PIL's Image.MAX_IMAGE_PIXELS)") from err
        except _DECODE_ERRORS as err:
            raise _decode_error(name, err) from err
        _check_size(image.size, name, max_pixels)
        yield image, name


# What PIL's decoders raise on bad data, depending on the format and where the data breaks
# (ValueError: "Truncated IHDR chunk" from a PNG, "tile cannot extend outside image" from a GIF,
# both found by tests/test_fuzz_inputs.py).
_DECODE_ERRORS = (OSError, SyntaxError, EOFError, ValueError, struct.error, zlib.error)


def _decode_error(name: str, err: BaseException) -> ImageError:
    # PIL's message for unrecognised data names an anonymous file: say it in words instead.
    detail = ("no image format recognised" if isinstance(err, Image.UnidentifiedImageError)
              else f"{type(err).__name__}: {err}")
    return ImageError(f"image {name!r}: cannot decode it, the file is corrupt, truncated or not "
                      f"an image ({detail})")


def _decoded_rgb(image: Image.Image, name: str) -> Image.Image:
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
        raise ImageError(f"image {name!r}: expected a non-empty image, got size {width}x{height}")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(
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
                 thumbnail_tag: str = DEFAULT_THUMBNAIL_TAG, has_thumbnail: bool = True,
                 tagged: bool = True) -> str:
    """The NVLM-D text that replaces one `<image>`:

        <Image><tile_1>{image_token x tokens_per_tile}...<tile_global_thumbnail>{...}</Image>

    No separators: the released NVLM-D code concatenates exactly like this. tagged=False leaves the
    tile tags out (the paper's Table 1 "no tag" baseline): `<Image>{all tiles' tokens}</Image>`.
    """
    _require_positive_int(tokens_per_tile, "tokens_per_tile")
    if not image_token:
        raise ValueError(f"image_token: expected a non-empty string, got {image_token!r}")
    tiles = "".join((tag if tagged else "") + image_token * tokens_per_tile
                    for tag in tile_tags(num_tiles, thumbnail_tag, has_thumbnail))
    return f"<Image>{tiles}</Image>"


@dataclass
class ImageLayout:
    """Where one image with n tiles goes (tile indices 0..n-1 in dynamic_tiles' order).

    opening: decoder text before the image's span, seeing what the text before it sees (NVLM-X:
        `<Image>`, so that the tokens of `<tile_1>` depend on tile 1 alone, even through the
        decoder's self-attention).
    pieces: the rest of the decoder text that replaces `<image>`, as (text, tile) pieces: `tile`
        is the tile whose tag the piece is (NVLM-X: its tokens see only that tile), else -1.
    decoder_tiles: the tiles whose rows fill the placeholders of `pieces`, in order.
    memory_tiles: the tiles that make up the image's X-attn memory, in order.
    memory_tags: NVLM-H, the tag text before each memory tile (embedded into the memory); else [].
    """

    opening: str
    pieces: list[tuple[str, int]]
    decoder_tiles: list[int]
    memory_tiles: list[int] = dataclasses.field(default_factory=list)
    memory_tags: list[str] = dataclasses.field(default_factory=list)


def image_layout(arch: str, num_tiles: int, tokens_per_tile: int, image_token: str,
                 thumbnail_tag: str = DEFAULT_THUMBNAIL_TAG,
                 has_thumbnail: bool = True, tagged: bool = True) -> ImageLayout:
    """NVLM.md sections 6 and 8, per architecture:

    - D: `<Image>` + per tile its tag and placeholders + `</Image>` (image_prompt), every tile in
      the decoder;
    - X: `<Image>` + the tags alone + `</Image>` in the decoder; every tile in the memory, tag k's
      tokens tied to tile k;
    - H: `<Image>` + the thumbnail tag and the thumbnail's placeholders + `</Image>` in the
      decoder; the regular tiles in the memory, each after its embedded tag. [our choice] Without
      a thumbnail tile (use_thumbnail off) the decoder span is `<Image></Image>`; a one-tile
      image is its own thumbnail and has no memory.

    tagged=False (NVLM-D only): no tile tags, the paper's Table 1 "no tag" baseline.
    """
    if not tagged and arch != "D":
        raise ValueError(f"tagged: False is for arch 'D' only (NVLM-{arch} ties its tags to "
                         "tiles)")
    tags = tile_tags(num_tiles, thumbnail_tag, has_thumbnail)
    tiles = list(range(num_tiles))
    if arch == "D":
        return ImageLayout("", [(image_prompt(num_tiles, tokens_per_tile, image_token,
                                              thumbnail_tag, has_thumbnail, tagged), -1)], tiles)
    if arch == "X":
        return ImageLayout("<Image>", [*zip(tags, tiles), ("</Image>", -1)], [], tiles)
    if arch == "H":
        regular = tiles[:-1] if has_thumbnail else tiles
        thumbnail = tiles[len(regular):]
        span = "".join(tags[t] + image_token * tokens_per_tile for t in thumbnail)
        return ImageLayout("", [(f"<Image>{span}</Image>", -1)], thumbnail, regular,
                           [tags[t] for t in regular])
    raise ValueError(f"arch: expected 'D', 'X' or 'H', got {arch!r}")


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
        if not isinstance(role, str) or role not in _ROLES:
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
class XAttnSample:
    """NVLM-X/H: one sample's images as the X-attn needs them (indices local to the sample;
    pack_samples offsets them and turns them into nvlm.xattn.XAttnInputs)."""

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


class NVLMProcessor:
    """Tokenizes conversations with images into a ProcessedSample (NVLM.md sections 2 and 6).

    Tile size, max tiles, thumbnail, thumbnail tag and tokens per tile come from the config.
    `max_tiles` may be overridden per call (pretraining uses 1: one 1x1 tile, no thumbnail).
    """

    def __init__(self, tokenizer: Tokenizer, config: NVLMConfig) -> None:
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
        # What the processor writes around and inside an image span (NVLM.md section 6).
        self._markup = re.compile(r"</?Image>|<tile_\d+>|" + re.escape(config.thumbnail_tag))

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

    def image_layout(self, num_tiles: int) -> ImageLayout:
        """Where one `<image>` with `num_tiles` tiles goes, for this config's architecture."""
        # A lone tile is the whole image, so it is tagged as the thumbnail even when
        # use_thumbnail is off (the released code tags every last tile that way).
        has_thumbnail = self.config.use_thumbnail or num_tiles == 1
        return image_layout(self.config.arch, num_tiles, self.tokens_per_tile,
                            self.tokenizer.image_token, thumbnail_tag=self.config.thumbnail_tag,
                            has_thumbnail=has_thumbnail, tagged=self.config.tile_tags)

    def image_text(self, num_tiles: int) -> str:
        """What one `<image>` with `num_tiles` tiles becomes in the decoder's text."""
        layout = self.image_layout(num_tiles)
        return layout.opening + "".join(text for text, _tile in layout.pieces)

    def __call__(self, conversations: Sequence[Mapping[str, Any]],
                 images: ImageSource | Sequence[ImageSource] | None = None,
                 max_tiles: int | None = None, max_len: int | None = None) -> ProcessedSample:
        """A training sample from one conversation (a list of turns, see normalize_conversation).

        Each `<image>` in the user turns is replaced, in order, by the next image's tiles (its
        prompt layout); with images but no `<image>` at all, `<image>\n` is prepended to the
        first user turn. Placeholders and images must then match one to one (ValueError with
        both counts otherwise), and the image token itself may not appear as text. Labels are
        IGNORE_INDEX except on the assistant answers and their closing `<|im_end|>`; a
        conversation without an assistant turn has no labelled token.

        max_len: the sample's token budget (a packed row), or None. Over it, SampleTooLong is
        raised; images are decoded one at a time, and not at all when their headers already
        show that their decoder tokens alone exceed the budget.
        """
        return self._build(normalize_conversation(conversations), images, max_tiles,
                           add_generation_prompt=False, max_len=max_len)

    def prompt(self, question: str, images: ImageSource | Sequence[ImageSource] | None = None,
               max_tiles: int | None = None, system: str | None = None) -> ProcessedSample:
        """A generation prompt: [system turn,] the user turn, then `<|im_start|>assistant\\n`."""
        if not isinstance(question, str):
            raise TypeError(f"question: expected str, got {type(question).__name__}")
        turns = ([("system", system)] if system is not None else []) + [("user", question)]
        return self._build(turns, images, max_tiles, add_generation_prompt=True)

    def _build(self, turns: list[tuple[str, str]],
               images: ImageSource | Sequence[ImageSource] | None, max_tiles: int | None,
               add_generation_prompt: bool, max_len: int | None = None) -> ProcessedSample:
        images = _as_image_list(images)
        max_tiles = check_max_tiles(self.config.max_tiles if max_tiles is None else max_tiles)
        if max_len is not None:
            _require_positive_int(max_len, "max_len")
        if self.config.arch != "D" and max_tiles > self.config.max_tiles:
            # NVLM-X/H size their tile tags and X-attn memory by the preset
            raise ValueError(f"max_tiles: expected at most config.max_tiles "
                             f"({self.config.max_tiles}) for NVLM-{self.config.arch}, got "
                             f"{max_tiles}")
        image_token = self.tokenizer.image_token
        for i, (_, text) in enumerate(turns):
            if image_token in text:
                raise ValueError(
                    f"conversation[{i}]: contains the image token {image_token!r} as text; it "
                    f"is reserved for image rows (write {IMAGE_PLACEHOLDER!r} where an image goes)")
            tag = self._markup.search(text) if self.config.arch != "D" else None
            if tag:
                # NVLM-X/H tie the tokens of these tags to tiles: text that spells one out would
                # be a tag the processor cannot match to any tile
                raise ValueError(
                    f"conversation[{i}]: contains the image markup {tag.group(0)!r} as text; the "
                    f"processor writes the image spans and tile tags itself (write "
                    f"{IMAGE_PLACEHOLDER!r} where an image goes)")

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
        if max_len is not None:
            self._check_image_budget(images, max_tiles, max_len)

        tiles: list[Image.Image] = []
        num_tiles: list[int] = []
        for image in images:
            # Decoded one at a time: only the tiles outlive the loop, not the full-size image.
            image_tiles = dynamic_tiles(load_image(image), self.tile_size, max_tiles,
                                        self.config.use_thumbnail)
            tiles.extend(image_tiles)
            num_tiles.append(len(image_tiles))

        layouts = [self.image_layout(n) for n in num_tiles]
        first_tiles = np.cumsum([0] + num_tiles[:-1]).tolist() if num_tiles else []
        tokens = _Tokens()
        next_image = 0
        for role, text in turns:
            if role != "user" or IMAGE_PLACEHOLDER not in text:
                self._append_turn(role, [(text, -1, -1)], tokens)
                continue
            parts = text.split(IMAGE_PLACEHOLDER)
            segments = [(parts[0], -1, -1)]
            for part in parts[1:]:
                layout, base = layouts[next_image], first_tiles[next_image]
                segments.append((layout.opening, -1, -1))
                segments += [(piece, next_image, base + tile if tile >= 0 else -1)
                             for piece, tile in layout.pieces]
                segments.append((part, -1, -1))
                next_image += 1
            if self.config.arch == "D":
                # One string, as the released NVLM-D code tokenizes it.
                segments = [("".join(piece for piece, _, _ in segments), -1, -1)]
            self._append_turn(role, segments, tokens)
        if add_generation_prompt:
            tokens.add(self.tokenizer.encode(chatml_header("assistant")), labelled=False)

        if max_len is not None and len(tokens.ids) > max_len:
            # Truncating would cut image placeholders or answers: the caller drops the sample.
            raise SampleTooLong(f"sample: {len(tokens.ids)} tokens > row of {max_len}")
        input_ids = torch.tensor(tokens.ids, dtype=torch.int64)
        decoder_tiles = [base + t for layout, base in zip(layouts, first_tiles)
                         for t in layout.decoder_tiles]
        expected = len(decoder_tiles) * self.tokens_per_tile
        found = int((input_ids == self.tokenizer.image_token_id).sum())
        if found != expected:
            # Only a tokenizer that splits or merges the image token can get here.
            raise ValueError(f"input_ids: expected {expected} image tokens ({len(decoder_tiles)} "
                             f"tile(s) in the decoder x {self.tokens_per_tile} per tile), found "
                             f"{found}")
        if tiles:
            pixel_values = image_to_tensor(tiles)
        else:
            pixel_values = torch.empty(0, 3, self.tile_size, self.tile_size, dtype=torch.float32)
        xattn = None
        if self.config.arch != "D":
            xattn = self._xattn_sample(tokens, layouts, first_tiles, decoder_tiles)
        return ProcessedSample(input_ids=input_ids,
                               labels=torch.tensor(tokens.labels, dtype=torch.int64),
                               pixel_values=pixel_values, num_tiles=num_tiles,
                               num_image_tokens=expected, xattn=xattn)

    def _check_image_budget(self, images: list[ImageSource], max_tiles: int,
                            max_len: int) -> None:
        """SampleTooLong if the images alone need more than max_len decoder tokens, found from
        their headers (image_size) before any pixel is decoded. A lower bound, so a sample that
        fits is never refused: per image the smaller count of the two orientations (EXIF may
        turn the image on decoding), and at least one token (NVLM-X: the tags' text)."""
        needed = 0
        for i, image in enumerate(images):
            width, height = image_size(image)
            needed += max(1, min(self._decoder_image_tokens(w, h, max_tiles)
                                 for w, h in ((width, height), (height, width))))
            if needed > max_len:
                raise SampleTooLong(f"images: the first {i + 1} of {len(images)} need at least "
                                    f"{needed} tokens, more than a row of {max_len}")

    def _decoder_image_tokens(self, width: int, height: int, max_tiles: int) -> int:
        """Placeholders in the decoder for a width x height image (NVLM-X: none)."""
        num_tiles = len(tile_boxes(width, height, self.tile_size, max_tiles,
                                   self.config.use_thumbnail))
        return len(self.image_layout(num_tiles).decoder_tiles) * self.tokens_per_tile

    def _xattn_sample(self, tokens: "_Tokens", layouts: list[ImageLayout],
                      first_tiles: list[int], decoder_tiles: list[int]) -> XAttnSample:
        memory_tiles, memory_ids, memory_sizes = [], [], []
        placeholders = [self.tokenizer.image_token_id] * self.tokens_per_tile
        for layout, base in zip(layouts, first_tiles):
            memory_tiles += [base + t for t in layout.memory_tiles]
            size = len(layout.memory_tiles) * self.tokens_per_tile
            for tag in layout.memory_tags:   # NVLM-H: embed(<tile_k>) before tile k
                tag_ids = self.tokenizer.encode(tag)
                memory_ids += tag_ids + placeholders
                size += len(tag_ids)
            memory_sizes.append(size)
        as_tensor = lambda values: torch.tensor(values, dtype=torch.int64)  # noqa: E731
        h = self.config.arch == "H"
        return XAttnSample(image_index=as_tensor(tokens.image_index),
                           tile_index=None if h else as_tensor(tokens.tile_index),
                           decoder_tiles=decoder_tiles, memory_tiles=memory_tiles,
                           memory_ids=as_tensor(memory_ids) if h else None,
                           memory_sizes=memory_sizes, tokens_per_tile=self.tokens_per_tile)

    def _append_turn(self, role: str, segments: list[tuple[str, int, int]],
                     tokens: "_Tokens") -> None:
        """One ChatML turn whose body is `segments` (text, image, tile), each encoded on its own
        (NVLM-X/H: so every token knows which image span and tile tag it belongs to)."""
        # Header, body and the closing newline are encoded separately: the model generates an
        # answer from right after `<|im_start|>assistant\n`, so training sees the answer's tokens
        # exactly as generation produces them (no BPE merge across the header), and the
        # label boundaries are exact token boundaries.
        answer = role == "assistant"
        tokens.add(self.tokenizer.encode(chatml_header(role)), labelled=False)
        text, image, tile = segments[-1]    # always text: an image span is followed by text
        segments = [*segments[:-1], (text + IM_END, image, tile)]
        for text, image, tile in segments:
            tokens.add(self.tokenizer.encode(text), labelled=answer, image=image, tile=tile)
        tokens.add(self.tokenizer.encode("\n"), labelled=False)


@dataclass
class _Tokens:
    """The ids of a sample as they are built, with their labels and X-attn indices."""

    ids: list[int] = dataclasses.field(default_factory=list)
    labels: list[int] = dataclasses.field(default_factory=list)
    image_index: list[int] = dataclasses.field(default_factory=list)
    tile_index: list[int] = dataclasses.field(default_factory=list)

    def add(self, ids: list[int], labelled: bool, image: int = -1, tile: int = -1) -> None:
        self.ids += ids
        self.labels += ids if labelled else [IGNORE_INDEX] * len(ids)
        self.image_index += [image] * len(ids)
        self.tile_index += [tile] * len(ids)


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
    xattn: XAttnInputs | None = None   # NVLM-X/H: tile routing and each token's memory range

    def __len__(self) -> int:
        return self.input_ids.numel()

    @property
    def num_samples(self) -> int:
        return self.cu_seqlens.numel() - 1

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PackedBatch":
        return dataclasses.replace(
            self, **{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                     for f in dataclasses.fields(self)
                     if isinstance(getattr(self, f.name), (torch.Tensor, XAttnInputs))})


def pack_samples(samples: Sequence[ProcessedSample]) -> PackedBatch:
    """Concatenate samples, in order, into one PackedBatch (no truncation, no reordering)."""
    if len(samples) == 0:
        raise ValueError("samples: expected at least one sample, got none")
    tile_shapes = {tuple(s.pixel_values.shape[1:]) for s in samples}
    if len(tile_shapes) != 1:
        raise ValueError(f"samples: expected one tile shape (3, S, S) for all samples, "
                         f"got {sorted(tile_shapes)}")
    with_xattn = {s.xattn is not None for s in samples}
    if len(with_xattn) != 1:
        raise ValueError("samples: expected all from one architecture, got NVLM-D samples (no "
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


def _require_positive_int(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected a positive int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value}")
