"""Command line: `python -m nvlm <command> ...`.

    python -m nvlm tiles photo.jpg                     # grid and tile table for NVLM's tiling
    python -m nvlm tiles photo.jpg --out tiles.png     # ... and a picture of the grid with tags
    python -m nvlm tiles photo.jpg --arch H            # ... and where each tile goes in NVLM-H
    python -m nvlm generate --model DIR --image photo.jpg --prompt "What does the sign say?"

Each command is a `_add_<command>(subparsers)` function that declares its arguments and sets
`run`, a function of the parsed arguments that returns the exit code; list it in `_COMMANDS`.
Every flag is checked while the command line is parsed, by its `type` (the flag types below,
shared with `python -m nvlm.data`): argparse then prints the usage and one `error:` line naming
the flag, and the command exits with 2 before any work starts. Expected failures of the work
itself (a missing or corrupt file) print one line and exit with 2 as well.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from PIL import Image, ImageDraw, ImageFont

from nvlm.config import MAX_TILES_LIMIT
from nvlm.processing import (DEFAULT_THUMBNAIL_TAG, find_grid, image_layout, load_image,
                             regular_file_problem, tile_boxes, tile_tags)

EXIT_USAGE = 2
# torch.Generator.manual_seed takes 64-bit seeds; [0, 2^63) is valid everywhere a seed goes.
SEED_LIMIT = 2**63


# ---------------------------------------------------------------------------------------------
# Flag types: argparse calls them on the flag's text and reports an ArgumentTypeError as
# "argument --flag: <message>".

def int_flag(low: int, high: int | None = None) -> Callable[[str], int]:
    """An integer in [low, high] (no upper bound when high is None)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"expected an integer {bounds}, got {value}")
        return value
    return parse


def float_flag(low: float, high: float = math.inf,
               low_open: bool = False) -> Callable[[str], float]:
    """A finite number in [low, high], or (low, high] when low_open."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        inside = (value > low if low_open else value >= low) and value <= high
        if not math.isfinite(value) or not inside:
            bounds = (f"{'>' if low_open else '>='} {low:g}" if high == math.inf
                      else f"in {'(' if low_open else '['}{low:g}, {high:g}]")
            raise argparse.ArgumentTypeError(f"expected a finite number {bounds}, got {text!r}")
        return value
    return parse


def seed_flag(text: str) -> int:
    """A random seed in [0, SEED_LIMIT)."""
    return int_flag(0, SEED_LIMIT - 1)(text)


def non_empty_flag(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("expected a non-empty string")
    return text


def existing_dir_flag(text: str) -> Path:
    problem = regular_file_problem(text)
    if problem != "is a directory":
        raise argparse.ArgumentTypeError(f"expected a directory, but {text!r} "
                                         f"{problem or 'is a file'}")
    return Path(text)


def existing_file_flag(text: str) -> Path:
    problem = regular_file_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(f"expected a file, but {text!r} {problem}")
    return Path(text)


def output_file_flag(text: str) -> Path:
    """A file to write: a regular file or nothing yet, in a folder that exists."""
    problem = regular_file_problem(text)
    if problem not in (None, "does not exist"):
        raise argparse.ArgumentTypeError(f"expected a file to write, but {text!r} {problem}")
    if regular_file_problem(os.path.dirname(os.path.abspath(text))) != "is a directory":
        raise argparse.ArgumentTypeError(f"expected a file in an existing folder, but the folder "
                                         f"of {text!r} does not exist")
    return Path(text)


def output_dir_flag(text: str) -> Path:
    """A folder to write into: a directory or nothing yet, whose nearest existing ancestor is a
    directory (the folders in between are created)."""
    path = Path(os.path.abspath(text))
    while (problem := regular_file_problem(path)) == "does not exist" and path != path.parent:
        path = path.parent
    if problem != "is a directory":
        raise argparse.ArgumentTypeError(f"expected a folder, but {str(path)!r} "
                                         f"{problem or 'is a file'}")
    return Path(text)


def device_flag(text: str) -> str:
    """cpu, cuda or cuda:N, where that device exists; auto: cuda if there is one, else cpu."""
    import torch

    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has no CUDA device "
                                             "(torch.cuda.is_available() is False); use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has "
                                             f"{torch.cuda.device_count()} CUDA device(s)")
    return text


# ---------------------------------------------------------------------------------------------
# Commands


def _add_tiles(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "tiles", help="show how an image is cut into tiles (NVLM dynamic high-resolution)",
        description="Print the tile grid NVLM's dynamic tiling picks for IMAGE and, for every "
                    "tile, its tag and the region of the original image it shows.")
    # The image is checked when it is read: its errors are one line naming the file.
    parser.add_argument("image", type=Path, help="image file")
    parser.add_argument("--out", type=output_file_flag, default=None,
                        help="write a PNG of the image with the grid and the tile tags drawn on it")
    parser.add_argument("--tile-size", type=int_flag(1), default=448, help="tile side S in pixels")
    parser.add_argument("--max-tiles", type=int_flag(1, MAX_TILES_LIMIT), default=6,
                        help=f"regular tiles per image at most (1 to {MAX_TILES_LIMIT})")
    parser.add_argument("--no-thumbnail", action="store_true",
                        help="do not append the whole-image thumbnail tile")
    parser.add_argument("--thumbnail-tag", type=non_empty_flag, default=DEFAULT_THUMBNAIL_TAG,
                        help="tag of the thumbnail tile (`<tile_global>` for the 34B model)")
    parser.add_argument("--arch", choices=["D", "X", "H"], default=None,
                        help="also show where each tile goes in that architecture: the decoder's "
                             "sequence or the X-attn memory (NVLM.md sections 1 and 8)")
    parser.set_defaults(run=_run_tiles)


_DESTINATIONS = {
    ("D", "decoder"): "decoder: tag + image tokens",
    ("X", "memory"): "X-attn memory (the tag stays in the text and sees this tile only)",
    ("H", "decoder"): "decoder: tag + image tokens",
    ("H", "memory"): "X-attn memory, after embed(tag)",
}


def _destinations(arch: str, num_tiles: int, thumbnail_tag: str,
                  has_thumbnail: bool) -> list[str]:
    layout = image_layout(arch, num_tiles, 1, "<image token>", thumbnail_tag, has_thumbnail)
    decoder = set(layout.decoder_tiles)    # every other tile is in the memory
    return [_DESTINATIONS[(arch, "decoder" if t in decoder else "memory")]
            for t in range(num_tiles)]


def _run_tiles(args: argparse.Namespace) -> int:
    image = load_image(args.image)
    width, height = image.size
    use_thumbnail = not args.no_thumbnail
    cols, rows = find_grid(width, height, args.tile_size, args.max_tiles)
    boxes = tile_boxes(width, height, args.tile_size, args.max_tiles, use_thumbnail)
    # Tagged as the processor tags them: a lone tile is the whole image (the thumbnail tag).
    tags = tile_tags(len(boxes), args.thumbnail_tag,
                     has_thumbnail=use_thumbnail or len(boxes) == 1)
    has_thumbnail_tile = len(boxes) > cols * rows

    print(f"image: {args.image} ({width}x{height} px, width x height)")
    thumbnail_note = " + thumbnail" if has_thumbnail_tile else ""
    print(f"grid: {cols}x{rows} (cols x rows){thumbnail_note} = {len(boxes)} tile(s) of "
          f"{args.tile_size}x{args.tile_size} px")
    tag_width = max(len("tag"), *(len(tag) for tag in tags))
    print(f"{'index':>5}  {'tag':<{tag_width}}  box in the image (left, top, right, bottom)")
    goes_to = None
    if args.arch is not None:
        goes_to = _destinations(args.arch, len(boxes), args.thumbnail_tag,
                                has_thumbnail=use_thumbnail or len(boxes) == 1)
    for index, (tag, box) in enumerate(zip(tags, boxes)):
        is_thumbnail = has_thumbnail_tile and index == len(boxes) - 1
        whole = "  (whole image, squashed)" if is_thumbnail else ""
        destination = f"  -> NVLM-{args.arch} {goes_to[index]}" if goes_to else ""
        print(f"{index:>5}  {tag:<{tag_width}}  ({', '.join(_fmt(v) for v in box)}){whole}"
              f"{destination}")

    if args.out is not None:
        _draw_tiles(image, boxes[:cols * rows], tags, has_thumbnail_tile,
                    args.tile_size).save(args.out, format="PNG")
        print(f"wrote {args.out}")
    return 0


def _fmt(value: float) -> str:
    # Tile edges fall between pixels when the size does not divide evenly: show one decimal.
    return f"{round(value, 1):g}"


def _draw_tiles(image: Image.Image, grid_boxes: list[tuple[float, float, float, float]],
                tags: list[str], has_thumbnail_tile: bool, tile_size: int) -> Image.Image:
    canvas = image.copy()
    draw = ImageDraw.Draw(canvas)
    width, height = canvas.size
    font_size = max(10, min(width, height) // 30)
    font = ImageFont.load_default(size=font_size)
    line_width = max(1, min(width, height) // 300)
    for tag, (left, top, right, bottom) in zip(tags, grid_boxes):
        draw.rectangle((left, top, right - 1, bottom - 1), outline=(255, 0, 0), width=line_width)
        _label(draw, (left + 2 * line_width, top + 2 * line_width), tag, font)
    if has_thumbnail_tile:
        note = f"+ {tags[-1]}: the whole image squashed to {tile_size}x{tile_size}"
        _label(draw, (2 * line_width, height - font_size - 6 * line_width), note, font)
    return canvas


def _label(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str,
           font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> None:
    # White text on a dark box stays readable on any photo.
    draw.rectangle(draw.textbbox(xy, text, font=font), fill=(0, 0, 0))
    draw.text(xy, text, fill=(255, 255, 255), font=font)


def _add_generate(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate", help="answer a prompt about an image with a checkpoint",
        description="Load a checkpoint directory (NVLM-D / InternVL layout, or a trainer's "
                    "run/model folder) and generate an answer with the KV cache.")
    parser.add_argument("--model", type=existing_dir_flag, required=True,
                        help="checkpoint directory")
    parser.add_argument("--image", type=existing_file_flag, default=None,
                        help="image file (optional)")
    parser.add_argument("--prompt", required=True, help="the question")
    parser.add_argument("--max-new-tokens", type=int_flag(1), default=128)
    parser.add_argument("--temperature", type=float_flag(0.0), default=0.0, help="0: greedy")
    parser.add_argument("--top-p", type=float_flag(0.0, 1.0, low_open=True), default=1.0,
                        help="nucleus sampling mass, in (0, 1]")
    parser.add_argument("--seed", type=seed_flag, default=0, help="sampling seed")
    parser.add_argument("--device", type=device_flag, default="auto",
                        help="auto (cuda if there is one), cpu, cuda or cuda:N")
    parser.set_defaults(run=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    import torch

    from nvlm.model import NVLM
    from nvlm.processing import NVLMProcessor
    from nvlm.tokenizer import load_tokenizer

    model = NVLM.from_pretrained(args.model).to(args.device).eval()
    processor = NVLMProcessor(load_tokenizer(args.model), model.config)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.device.startswith("cuda")):
        answer = model.chat(processor, args.image, args.prompt,
                            max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_p=args.top_p, generator=generator)
    print(answer)
    return 0


_COMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (_add_tiles, _add_generate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nvlm",
                                     description="NVLM-D/X/H tools.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in _COMMANDS:
        add_command(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:      # --help (0), or a bad flag (2): argparse printed why
        return done.code
    try:
        return args.run(args)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
