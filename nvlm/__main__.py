"""Command line: `python -m nvlm <command> ...`.

    python -m nvlm tiles photo.jpg                     # grid and tile table for NVLM's tiling
    python -m nvlm tiles photo.jpg --out tiles.png     # ... and a picture of the grid with tags
    python -m nvlm tiles photo.jpg --arch H            # ... and where each tile goes in NVLM-H
    python -m nvlm generate --model DIR --image photo.jpg --prompt "What does the sign say?"

Each command is a `_add_<command>(subparsers)` function that declares its arguments and sets
`run`, a function of the parsed arguments that returns the exit code; list it in `_COMMANDS`.
Every flag is checked while the command line is parsed, by its `type` (the flag types of nvlm.flags,
shared with `python -m nvlm.data`): argparse then prints the usage and one `error:` line naming
the flag, and the command exits with 2 before any work starts. Expected failures of the work
itself (a missing or corrupt file) print one line and exit with 2 as well.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Sequence

from PIL import Image, ImageDraw, ImageFont

from nvlm.config import DEFAULT_THUMBNAIL_TAG, MAX_TILES_LIMIT
from nvlm.errors import InputError
from nvlm.flags import (EXIT_USAGE, device_flag, existing_dir_flag, existing_file_flag, float_flag,
                        int_flag, non_empty_flag, output_file_flag, seed_flag)
from nvlm.images import find_grid, load_image, tile_boxes
from nvlm.processing import image_layout, tile_tags

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
                             "sequence or the X-attn memory (docs/nvlm.md sections 1 and 8)")
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

    from nvlm.generate import chat
    from nvlm.model import NVLM
    from nvlm.processing import NVLMProcessor
    from nvlm.tokenizer import load_tokenizer

    model = NVLM.from_pretrained(args.model).to(args.device).eval()
    processor = NVLMProcessor(load_tokenizer(args.model), model.config)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.device.startswith("cuda")):
        answer = chat(model, processor, args.image, args.prompt,
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
    except (OSError, InputError) as err:   # a refused input; anything else is a bug: traceback
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
