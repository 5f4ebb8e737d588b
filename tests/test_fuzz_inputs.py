"""Bounded fuzzing of the two parsers that take untrusted bytes: image files (load_image) and
JSONL lines (JsonlSource through SampleStream).

Fixed seeds, a few hundred cases each, a few seconds in all. Every case must end in one of the
documented ways, within TIME_PER_CASE_S: an image is a correct RGB image, an ImageError naming
the source or an OSError; a line is a counted skip or a valid sample. Images are capped at
FUZZ_MAX_PIXELS (a mutated header can claim up to that many pixels), which keeps every case's
memory to a few MB, so no case needs a resource limit.

Found so far: PIL ValueErrors that escaped load_image's wrapping ("Truncated IHDR chunk",
"tile cannot extend outside image"; now ImageErrors), and a role given as a list or an object,
which failed with "unhashable type" and no turn index.
"""

from __future__ import annotations

import io
import json
import random
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nvlm.config import NVLMConfig
from nvlm.data import SampleStream, parse_data_spec
from nvlm.images import ImageError, load_image
from nvlm.processing import NVLMProcessor

TIME_PER_CASE_S = 5.0         # a hang or a quadratic blow-up, not a busy machine
FUZZ_MAX_PIXELS = 1 << 20
CASES_PER_IMAGE = 60
JSONL_CASES = 300
TINY = NVLMConfig.from_preset("tiny")


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One to three byte-level edits: flips, overwrites with edge values, insertions, deletions,
    duplicated spans, truncation."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        if not out:
            break
        at = rng.randrange(len(out))
        edit = rng.randrange(6)
        if edit == 0:
            out[at] ^= 1 << rng.randrange(8)
        elif edit == 1:     # sizes, lengths and counts live in 2- and 4-byte big-endian fields
            value = rng.choice([0, 1, 0x7F, 0x80, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF])
            width = rng.choice([1, 2, 4])
            out[at:at + width] = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "big")
        elif edit == 2:
            out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif edit == 3:
            del out[at:at + rng.randint(1, 64)]
        elif edit == 4:
            span = bytes(out[at:at + rng.randint(1, 64)])
            where = rng.randrange(len(out))
            out[where:where] = span * rng.randint(1, 4)
        else:
            del out[at:]
    return bytes(out)


# --- Images ---------------------------------------------------------------------------------------

def with_png_crcs(data: bytes) -> bytes:
    """PNG chunks' CRCs recomputed, as far as the chunk lengths still hold, so that a mutation
    reaches the decoder (header fields, palette, zlib stream) instead of the CRC check."""
    out, at = bytearray(data), 8
    while at + 12 <= len(out):
        (length,) = struct.unpack(">I", out[at:at + 4])
        end = at + 8 + length
        if end + 4 > len(out):
            break
        out[end:end + 4] = struct.pack(">I", zlib.crc32(out[at + 4:end]))
        at = end + 4
    return bytes(out)


def _encoded(image: Image.Image, fmt: str, **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_args)
    return buffer.getvalue()


def _base_images() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8))
    rgba = Image.fromarray(rng.integers(0, 256, (10, 9, 4), dtype=np.uint8))
    gray16 = Image.fromarray(rng.integers(0, 65536, (8, 8), dtype=np.uint16))
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    exif = Image.Exif()
    exif[0x0112] = 6                            # orientation: rotate on load
    frames = [rgb.convert("P"), rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT).convert("P")]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], transparency=0)
    return {
        "png-rgb": _encoded(rgb, "PNG"),
        "png-rgba": _encoded(rgba, "PNG"),
        "png-16bit": _encoded(gray16, "PNG"),
        "png-palette-transparent": _encoded(palette, "PNG", transparency=0),
        "jpeg-exif": _encoded(rgb, "JPEG", quality=80, exif=exif),
        "jpeg-progressive-gray": _encoded(rgb.convert("L"), "JPEG", progressive=True),
        "gif-animated": gif.getvalue(),
    }


BASE_IMAGES = _base_images()


@pytest.mark.filterwarnings("ignore::UserWarning:PIL")    # PIL's notes on broken EXIF tags
@pytest.mark.parametrize("name", sorted(BASE_IMAGES))
def test_mutated_images_decode_or_fail_cleanly(name, tmp_path):
    data = BASE_IMAGES[name]
    assert load_image(data).mode == "RGB"      # the unmutated file is fine
    rng = random.Random(f"image:{name}")
    outcomes = {"image": 0, "error": 0}
    for case in range(CASES_PER_IMAGE):
        mutated = mutate(data, rng)
        if name.startswith("png") and case % 2:
            mutated = with_png_crcs(mutated)
        source: bytes | Path = mutated
        if case % 10 == 0:                        # the file path as well as bytes
            source = tmp_path / f"case{case}"
            source.write_bytes(mutated)
        start = time.perf_counter()
        try:
            image = load_image(source, max_pixels=FUZZ_MAX_PIXELS)
        except (ImageError, OSError) as err:       # ValueErrors are ImageErrors naming the source
            assert str(source) in str(err) or "<image bytes>" in str(err), (name, case, err)
            outcomes["error"] += 1
        else:
            pixels = np.asarray(image)
            assert image.mode == "RGB" and pixels.dtype == np.uint8, (name, case)
            assert pixels.shape == (image.height, image.width, 3) and pixels.size > 0, (name, case)
            outcomes["image"] += 1
        elapsed = time.perf_counter() - start
        assert elapsed < TIME_PER_CASE_S, f"{name} case {case}: {elapsed:.1f} s"
    assert outcomes["error"] > 0, outcomes   # the mutations do reach the error paths


# --- JSONL lines ----------------------------------------------------------------------------------

EDGE_VALUES = [None, 0, -1, 1.5, 1e308, float("nan"), True, "", "<image>", "<image>" * 40,
               "<tile_1><Image>", "<|vision_pad|>", "\u0000", "x" * 5000, [], {}, [[[[[]]]]],
               {"from": "gpt", "value": "a"}, ["img/a.png"] * 30, "../outside.png", "/dev/zero",
               "img", "img/missing.png", "img/a.png"]


def _mutate_json(value, rng: random.Random):
    """Replace one node of a JSON value (a key's value, a list item, or a key) with an edge
    value, or drop it."""
    if isinstance(value, dict) and value and rng.random() < 0.8:
        key = rng.choice(sorted(value))
        out = dict(value)
        roll = rng.random()
        if roll < 0.15:
            del out[key]
        elif roll < 0.25:
            out[rng.choice(["from", "role", "value", "content", "image", "conversations"])] = \
                rng.choice(EDGE_VALUES)
        else:
            out[key] = _mutate_json(value[key], rng)
        return out
    if isinstance(value, list) and value and rng.random() < 0.8:
        out = list(value)
        at = rng.randrange(len(out))
        roll = rng.random()
        if roll < 0.15:
            del out[at]
        elif roll < 0.3:
            out.insert(at, rng.choice(EDGE_VALUES))
        else:
            out[at] = _mutate_json(value[at], rng)
        return out
    return rng.choice(EDGE_VALUES)


def _base_lines() -> list[dict]:
    turn = lambda who, text: {"from": who, "value": text}  # noqa: E731
    return [
        {"conversations": [turn("human", "Say hi."), turn("gpt", "hi")]},
        {"image": "img/a.png", "conversations": [turn("human", "<image>\nWhat?"),
                                                 turn("gpt", "A square.")]},
        {"image": ["img/a.png", "img/b.png"],
         "conversations": [turn("system", "Be brief."), turn("human", "<image> vs <image>"),
                           turn("gpt", "Same."), turn("human", "Sure?"), turn("gpt", "Yes.")]},
        {"image": "img/b.png", "conversations": [{"role": "user", "content": "Read it."},
                                                 {"role": "assistant", "content": "123"}]},
    ]


def _check_sample(sample, processor: NVLMProcessor, max_len: int) -> None:
    n = len(sample)
    assert 0 < n <= max_len
    assert sample.input_ids.dtype == torch.int64 and sample.input_ids.shape == (n,)
    assert sample.labels.shape == (n,)
    assert sample.pixel_values.shape == (sum(sample.num_tiles), 3, TINY.tile_size, TINY.tile_size)
    assert torch.isfinite(sample.pixel_values).all()
    image_tokens = int((sample.input_ids == processor.tokenizer.image_token_id).sum())
    assert image_tokens == sample.num_image_tokens


def test_mutated_jsonl_lines_are_skipped_or_valid(tmp_path, caplog):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (60, 30), (200, 10, 10)).save(tmp_path / "img" / "a.png")
    Image.new("RGB", (30, 90), (10, 200, 10)).save(tmp_path / "img" / "b.png")
    processor = NVLMProcessor.from_config(TINY)
    good = json.dumps(_base_lines()[0])
    base = [json.dumps(line).encode() for line in _base_lines()]
    rng = random.Random("jsonl")
    max_len = 400
    outcomes = {"sample": 0, "skip": 0, "blank": 0}
    for case in range(JSONL_CASES):
        if case % 2:
            mutated = mutate(rng.choice(base), rng)
        else:
            mutated = json.dumps(_mutate_json(rng.choice(_base_lines()), rng)).encode()
        mutated = mutated.replace(b"\n", b" ")    # one line stays one line
        path = tmp_path / "case.jsonl"
        path.write_bytes(mutated + b"\n" + f"{good}\n{good}\n".encode())
        stream = SampleStream(parse_data_spec(str(path)), processor, seed=0, max_len=max_len)
        start = time.perf_counter()
        sample = next(stream)
        elapsed = time.perf_counter() - start
        assert elapsed < TIME_PER_CASE_S, f"case {case}: {elapsed:.1f} s for {mutated[:200]!r}"
        line_of_sample = stream.mixture.sources[0].line
        skips = stream.skips.total()
        if line_of_sample == 1:                   # the mutated line made a sample
            assert skips == 0, (case, mutated[:200])
            outcomes["sample"] += 1
        elif skips == 1:                          # it was skipped, and counted, with a reason
            assert line_of_sample == 2, (case, mutated[:200])
            assert "unhashable" not in caplog.text, (case, mutated[:200])
            outcomes["skip"] += 1
        else:                                     # an empty line is no sample and no skip
            assert skips == 0 and line_of_sample == 2 and not mutated.strip(), (case, mutated)
            outcomes["blank"] += 1
        _check_sample(sample, processor, max_len)
    assert outcomes["sample"] > 20 and outcomes["skip"] > 100, outcomes
