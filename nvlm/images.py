"""Images: dynamic high-resolution tiling (docs/nvlm.md section 2), safe decoding, normalization.

    image = load_image("page.png")                       # RGB, bounded size, EXIF-rotated
    tiles = dynamic_tiles(image, tile_size=448, max_tiles=6)   # grid tiles + thumbnail
    pixel_values = image_to_tensor(tiles)                # (N, 3, S, S) float32

The geometry the processor and the vision warm-up share; nothing here knows about prompts,
tokenizers or the model.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import os
import stat
import struct
import warnings
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps

from nvlm.config import MAX_TILES_LIMIT, check_max_tiles
from .errors import InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# 8192 x 8192 = 67,108,864 pixels: far above any photo or scanned page NVLM sees (a 448-px tile
# grid of 6 is 2688 px wide), below PIL's own decompression-bomb limit (~179 Mpx), and ~200 MB
# as RGB, so a crafted header cannot make a data-loader worker allocate gigabytes.
DEFAULT_MAX_PIXELS = 8192 * 8192

ImageSource = Union[str, Path, bytes, bytearray, memoryview, Image.Image]


class ImageError(InputError):
    """An image that cannot be used: undecodable, truncated, too large, empty or not a regular
    file. A missing path or a directory raise FileNotFoundError / IsADirectoryError instead."""


# ---------------------------------------------------------------------------------------------
# Dynamic high-resolution tiling (docs/nvlm.md section 2)
# ---------------------------------------------------------------------------------------------

# The order of equal-product grids that docs/nvlm.md lists for max_tiles = 6. InternVL builds the
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

    Sorted by cols * rows; equal products in docs/nvlm.md's order (products up to 6), else rows
    ascending. For max_tiles = 6 this is docs/nvlm.md's list of 14. max_tiles is at most
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
    """(cols, rows) of the tile grid for a width x height image (docs/nvlm.md section 2, step 2).

    The grid whose cols/rows is closest to width/height; on an exact tie the later candidate
    wins only if the image has more than half the pixels of that grid
    (width * height > 0.5 * tile_size^2 * cols * rows). The arithmetic is InternVL's, in float,
    so exact ties fall where they fall in the released code.
    """
    require_positive_int(width, "width")
    require_positive_int(height, "height")
    require_positive_int(tile_size, "tile_size")
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
    """Cut an RGB image into S x S tiles (docs/nvlm.md section 2, steps 3-4).

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
        raise InputError("tiles: expected at least one tile, got none")
    sizes = {tile.size for tile in tiles}
    if len(sizes) != 1 or next(iter(sizes))[0] != next(iter(sizes))[1]:
        raise InputError(f"tiles: expected square tiles of one size, got sizes {sorted(sizes)}")
    modes = {tile.mode for tile in tiles}
    if modes != {"RGB"}:
        raise InputError(f"tiles: expected RGB tiles (see load_image), got modes {sorted(modes)}")
    pixels = np.stack([np.asarray(tile, dtype=np.uint8) for tile in tiles])   # (N, S, S, 3)
    # Channels first while still uint8: the float ops then run in place on a contiguous tensor
    # (7 tiles of 448 px: 45 ms instead of 72 ms on the 2-core CI machine).
    x = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))).float().div_(255)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)


def require_positive_int(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected a positive int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise InputError(f"{name}: expected a positive int, got {value}")
