"""Image tiling, image loading, prompt layout, the NVLM-D processor, packing and the CLI.

Expectations are written out here from docs/nvlm.md (sections 2 and 6), not computed with the code
under test. Tile sizes are small (28 px: 2x2 patches, 1 token per tile) so that prompts can be
spelled out and the run stays fast.
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nvlm.__main__ import main as cli_main
from nvlm.config import NVLMConfig
from nvlm.images import (candidate_grids, dynamic_tiles, find_grid, image_to_tensor, load_image,
                         tile_boxes)
from nvlm.packing import IGNORE_INDEX, ProcessedSample, pack_samples
from nvlm.processing import NVLMProcessor, chatml, image_prompt, tile_tags
from nvlm.tokenizer import ByteTokenizer, HFTokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
PAD = "<|vision_pad|>"


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def encoded(image: Image.Image, fmt: str, **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_args)
    return buffer.getvalue()


# --- Tiling (docs/nvlm.md section 2) -------------------------------------------------------------------

NVLM_ORDER_6 = [(1, 1), (1, 2), (2, 1), (3, 1), (1, 3), (4, 1), (1, 4), (2, 2), (1, 5), (5, 1),
                (6, 1), (2, 3), (1, 6), (3, 2)]


def test_candidate_order_for_6_is_nvlm_md():
    assert list(candidate_grids(6)) == NVLM_ORDER_6


def test_candidate_grids_other_max_tiles():
    assert list(candidate_grids(1)) == [(1, 1)]
    assert list(candidate_grids(4)) == NVLM_ORDER_6[:8]
    grids_12 = list(candidate_grids(12))
    assert grids_12[:14] == NVLM_ORDER_6
    assert sorted(grids_12) == sorted((c, r) for c in range(1, 13) for r in range(1, 13)
                                      if c * r <= 12)
    products = [c * r for c, r in grids_12]
    assert products == sorted(products)


# (width, height) -> (grid, tiles), docs/nvlm.md's worked examples (S=448, max 6).
WORKED_EXAMPLES = [
    ((448, 448), (1, 1), 1), ((600, 600), (1, 1), 1), ((1024, 1024), (2, 2), 5),
    ((1000, 500), (2, 1), 3), ((1920, 1080), (2, 1), 3), ((640, 480), (3, 2), 7),
    ((800, 1200), (2, 3), 7), ((3000, 500), (6, 1), 7),
]


@pytest.mark.parametrize("size,grid,num_tiles", WORKED_EXAMPLES)
def test_worked_examples(size, grid, num_tiles):
    assert find_grid(*size, tile_size=448, max_tiles=6) == grid
    assert len(tile_boxes(*size, tile_size=448, max_tiles=6)) == num_tiles
    tiles = dynamic_tiles(Image.new("RGB", size), tile_size=448, max_tiles=6)
    assert len(tiles) == num_tiles
    assert all(tile.size == (448, 448) for tile in tiles)


@pytest.mark.parametrize("size,grid", [
    # Ratio 1 ties (1,1) with (2,2): (2,2) needs W*H > 0.5 * 448^2 * 4 = 401408.
    ((633, 633), (1, 1)), ((634, 634), (2, 2)),
    # Ratio 1.25 is as far from (1,1)/(2,2) (1.0) as from (3,2) (1.5): each tie checks its own
    # grid's area, (2,2) needs 401408 and (3,2) 602112 pixels.
    ((700, 560), (1, 1)), ((720, 576), (2, 2)), ((1000, 800), (3, 2)),
    # Area matters only on ties: a tiny 2:1 image still gets two tiles.
    ((100, 50), (2, 1)), ((10, 60), (1, 6)),
])
def test_tie_and_area_rule(size, grid):
    assert find_grid(*size, tile_size=448, max_tiles=6) == grid


def internvl_find_grid(width, height, tile_size, max_tiles):
    """InternVL's released code, as a reference: candidates from a set, sorted by product."""
    ratios = set((i, j) for n in range(1, max_tiles + 1) for i in range(1, n + 1)
                 for j in range(1, n + 1) if i * j <= max_tiles)
    ratios = sorted(ratios, key=lambda x: x[0] * x[1])
    best_diff, best = float("inf"), (1, 1)
    for cols, rows in ratios:
        diff = abs(width / height - cols / rows)
        if diff < best_diff:
            best_diff, best = diff, (cols, rows)
        elif diff == best_diff and width * height > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best


def test_find_grid_matches_internvl_for_max_tiles_up_to_12():
    # Ties happen at the midpoints between two candidate ratios: try all of them, at areas on
    # both sides of the thresholds, plus a spread of ordinary sizes.
    sizes = {(w, h) for w in range(20, 3000, 173) for h in range(20, 3000, 191)}
    ratios = sorted({(c, r) for c in range(1, 13) for r in range(1, 13) if c * r <= 12})
    for c1, r1 in ratios:
        for c2, r2 in ratios:
            num, den = c1 * r2 + c2 * r1, 2 * r1 * r2     # (c1/r1 + c2/r2) / 2
            for scale in (1, 7, 40):
                sizes.add((num * scale, den * scale))
    for max_tiles in (1, 2, 6, 8, 12):
        for width, height in sorted(sizes):
            assert find_grid(width, height, 448, max_tiles) == \
                internvl_find_grid(width, height, 448, max_tiles), (width, height, max_tiles)


def test_tile_pixels_are_crops_of_the_bicubic_resize():
    image = noise_image(40, 60)                      # ratio 2/3 -> (2, 3) at S=28
    assert find_grid(40, 60, tile_size=28) == (2, 3)
    tiles = dynamic_tiles(image, tile_size=28, max_tiles=6)
    assert len(tiles) == 7
    resized = image.resize((56, 84), Image.Resampling.BICUBIC)
    for t, (col, row) in enumerate([(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]):
        crop = resized.crop((col * 28, row * 28, col * 28 + 28, row * 28 + 28))
        np.testing.assert_array_equal(np.asarray(tiles[t]), np.asarray(crop), err_msg=f"tile {t}")
    thumbnail = image.resize((28, 28), Image.Resampling.BICUBIC)
    np.testing.assert_array_equal(np.asarray(tiles[6]), np.asarray(thumbnail))


def test_tiles_without_thumbnail_and_single_tile():
    image = noise_image(56, 28)
    assert len(dynamic_tiles(image, tile_size=28, use_thumbnail=False)) == 2
    single = dynamic_tiles(image, tile_size=28, max_tiles=1)
    assert len(single) == 1
    np.testing.assert_array_equal(np.asarray(single[0]),
                                  np.asarray(image.resize((28, 28), Image.Resampling.BICUBIC)))


def test_tile_boxes_in_original_pixels():
    assert tile_boxes(1920, 1080) == [(0, 0, 960, 1080), (960, 0, 1920, 1080), (0, 0, 1920, 1080)]
    assert tile_boxes(600, 600) == [(0, 0, 600, 600)]
    assert tile_boxes(1000, 500, use_thumbnail=False) == [(0, 0, 500, 500), (500, 0, 1000, 500)]


def test_tiling_argument_errors():
    with pytest.raises(ValueError, match="width: expected a positive int, got 0"):
        find_grid(0, 10)
    with pytest.raises(ValueError, match="max_tiles: expected a positive int, got 0"):
        find_grid(10, 10, max_tiles=0)
    with pytest.raises(TypeError, match="height: expected a positive int, got float"):
        find_grid(10, 10.0)
    with pytest.raises(TypeError, match="image: expected a PIL image"):
        dynamic_tiles(np.zeros((4, 4, 3)))


# --- Normalization ------------------------------------------------------------------------------

def test_image_to_tensor_normalizes_with_imagenet_stats():
    tiles = [Image.new("RGB", (4, 4), (255, 0, 128)), Image.new("RGB", (4, 4), (0, 255, 64))]
    x = image_to_tensor(tiles)
    assert x.shape == (2, 3, 4, 4) and x.dtype == torch.float32
    expected = torch.tensor(
        [[(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225],
         [(0 - 0.485) / 0.229, (1 - 0.456) / 0.224, (64 / 255 - 0.406) / 0.225]])
    torch.testing.assert_close(x[:, :, 2, 3], expected)
    assert torch.equal(x.amax(dim=(2, 3)), x.amin(dim=(2, 3)))   # solid colour stays solid


def test_image_to_tensor_errors():
    with pytest.raises(ValueError, match="at least one tile"):
        image_to_tensor([])
    with pytest.raises(ValueError, match="square tiles of one size"):
        image_to_tensor([Image.new("RGB", (4, 4)), Image.new("RGB", (5, 5))])
    with pytest.raises(ValueError, match=r"RGB tiles.*\['L'\]"):
        image_to_tensor([Image.new("L", (4, 4))])


# --- Image loading ------------------------------------------------------------------------------

def pixel(image: Image.Image, xy=(0, 0)) -> tuple[int, ...]:
    assert image.mode == "RGB"
    return image.getpixel(xy)


def test_load_image_modes_from_files():
    gray = Image.new("L", (3, 2), 100)
    assert pixel(load_image(encoded(gray, "PNG"))) == (100, 100, 100)

    la = Image.new("LA", (2, 1), (100, 255))
    la.putpixel((1, 0), (100, 0))
    loaded = load_image(encoded(la, "PNG"))
    assert pixel(loaded, (0, 0)) == (100, 100, 100)
    assert pixel(loaded, (1, 0)) == (255, 255, 255)       # fully transparent -> white

    rgba = Image.new("RGBA", (3, 1), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (255, 0, 0, 0))
    rgba.putpixel((2, 0), (0, 0, 0, 128))
    loaded = load_image(encoded(rgba, "PNG"))
    assert pixel(loaded, (0, 0)) == (255, 0, 0)
    assert pixel(loaded, (1, 0)) == (255, 255, 255)
    # Half-transparent black on white: 255 * (1 - 128/255) = 127.
    assert all(abs(v - 127) <= 1 for v in pixel(loaded, (2, 0)))

    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.putpixel((1, 0), 1)
    loaded = load_image(encoded(palette, "PNG", transparency=0))
    assert pixel(loaded, (0, 0)) == (255, 255, 255)       # transparent palette entry
    assert pixel(loaded, (1, 0)) == (255, 0, 0)
    assert pixel(load_image(encoded(palette, "PNG")), (0, 0)) == (0, 0, 0)

    cmyk = Image.new("CMYK", (2, 1), (0, 255, 255, 0))    # no black, full magenta + yellow
    cmyk.putpixel((1, 0), (0, 0, 0, 255))
    loaded = load_image(encoded(cmyk, "TIFF"))
    assert pixel(loaded, (0, 0)) == (255, 0, 0)
    assert pixel(loaded, (1, 0)) == (0, 0, 0)

    sixteen = Image.fromarray(np.array([[0, 257 * 100, 65535]], dtype=np.uint16))
    assert sixteen.mode == "I;16"
    loaded = load_image(encoded(sixteen, "PNG"))
    assert [pixel(loaded, (x, 0)) for x in range(3)] == [(0, 0, 0), (100, 100, 100),
                                                         (255, 255, 255)]


def test_load_image_applies_exif_orientation(tmp_path):
    stored = Image.new("RGB", (4, 2), (0, 0, 255))
    stored.putpixel((0, 0), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6            # "rotate 90 degrees clockwise to display"
    path = tmp_path / "rotated.png"
    stored.save(path, exif=exif)
    loaded = load_image(path)
    assert loaded.size == (2, 4)
    assert pixel(loaded, (1, 0)) == (255, 0, 0)             # top-left went to the top-right


def test_load_image_sources(tmp_path):
    image = noise_image(5, 4)
    path = tmp_path / "noise.png"
    image.save(path)
    for source in (path, str(path), path.read_bytes(), image):
        loaded = load_image(source)
        np.testing.assert_array_equal(np.asarray(loaded), np.asarray(image))
    with pytest.raises(TypeError, match="expected a path, bytes or a PIL image, got int"):
        load_image(3)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")


def test_load_image_rejects_corrupt_truncated_huge_and_empty(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"this is not an image")
    with pytest.raises(ValueError, match=r"'.*bad\.jpg'.*cannot decode"):
        load_image(bad)
    image = noise_image(64, 64)
    for fmt in ("PNG", "JPEG"):
        data = encoded(image, fmt)
        path = tmp_path / f"truncated.{fmt.lower()}"
        path.write_bytes(data[: len(data) // 2])
        with pytest.raises(ValueError, match=rf"truncated\.{fmt.lower()}'.*truncated"):
            load_image(path)
    with pytest.raises(ValueError, match=r"64x64 = 4096 pixels exceeds max_pixels=4000.*larger "
                                         r"max_pixels"):
        load_image(encoded(image, "PNG"), max_pixels=4000)
    assert load_image(encoded(image, "PNG"), max_pixels=None).size == (64, 64)
    with pytest.raises(ValueError, match="non-empty image, got size 0x5"):
        load_image(Image.new("RGB", (0, 5)))


# --- Prompt layout and ChatML (docs/nvlm.md section 6) ----------------------------------------------

def test_tile_tags():
    assert tile_tags(1) == ["<tile_global_thumbnail>"]
    assert tile_tags(3) == ["<tile_1>", "<tile_2>", "<tile_global_thumbnail>"]
    assert tile_tags(7) == ["<tile_1>", "<tile_2>", "<tile_3>", "<tile_4>", "<tile_5>", "<tile_6>",
                            "<tile_global_thumbnail>"]
    assert tile_tags(3, thumbnail_tag="<tile_global>") == ["<tile_1>", "<tile_2>", "<tile_global>"]
    assert tile_tags(2, has_thumbnail=False) == ["<tile_1>", "<tile_2>"]
    with pytest.raises(ValueError, match="num_tiles: expected a positive int, got 0"):
        tile_tags(0)


def test_image_prompt_layout():
    assert image_prompt(1, 3, PAD) == f"<Image><tile_global_thumbnail>{PAD}{PAD}{PAD}</Image>"
    assert image_prompt(3, 2, PAD) == (
        f"<Image><tile_1>{PAD}{PAD}<tile_2>{PAD}{PAD}<tile_global_thumbnail>{PAD}{PAD}</Image>")
    assert image_prompt(3, 1, "<IMG_CONTEXT>", thumbnail_tag="<tile_global>") == (
        "<Image><tile_1><IMG_CONTEXT><tile_2><IMG_CONTEXT><tile_global><IMG_CONTEXT></Image>")
    assert image_prompt(2, 1, "#", has_thumbnail=False) == "<Image><tile_1>#<tile_2>#</Image>"


def test_chatml():
    assert chatml([("user", "Hi"), ("assistant", "Hello!")]) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n")
    assert chatml([("system", "Be brief."), ("user", "Hi")], add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n")


# --- NVLMProcessor --------------------------------------------------------------------------------

def small_config(**overrides) -> NVLMConfig:
    """The tiny preset with 28-px tiles: 2x2 patches -> 1 image token per tile."""
    config = NVLMConfig.from_preset("tiny")
    config.vision.image_size = 28
    for name, value in overrides.items():
        setattr(config, name, value)
    config.validate()
    assert config.tokens_per_tile == 1
    return config


@pytest.fixture
def processor() -> NVLMProcessor:
    return NVLMProcessor.from_config(small_config())


def decoded(processor: NVLMProcessor, ids: torch.Tensor) -> str:
    return processor.tokenizer.decode(ids, skip_special_tokens=False)


def labelled_text(processor: NVLMProcessor, sample: ProcessedSample) -> str:
    return decoded(processor, sample.labels[sample.labels != IGNORE_INDEX])


WIDE = noise_image(56, 28)       # (2, 1) grid + thumbnail = 3 tiles at S=28
TALL = noise_image(28, 84)       # (1, 3) grid + thumbnail = 4 tiles
THREE_TILES = (f"<Image><tile_1>{PAD}<tile_2>{PAD}<tile_global_thumbnail>{PAD}</Image>")
FOUR_TILES = (f"<Image><tile_1>{PAD}<tile_2>{PAD}<tile_3>{PAD}<tile_global_thumbnail>{PAD}"
              "</Image>")


def test_processor_single_image_conversation(processor):
    sample = processor([{"from": "human", "value": "<image>\nWhat is this?"},
                        {"from": "gpt", "value": "A cat."}], images=[WIDE])
    assert decoded(processor, sample.input_ids) == (
        f"<|im_start|>user\n{THREE_TILES}\nWhat is this?<|im_end|>\n"
        "<|im_start|>assistant\nA cat.<|im_end|>\n")
    assert labelled_text(processor, sample) == "A cat.<|im_end|>"
    assert sample.input_ids.dtype == sample.labels.dtype == torch.int64
    assert sample.labels.shape == sample.input_ids.shape
    assert sample.num_tiles == [3]
    assert sample.num_image_tokens == 3
    assert int((sample.input_ids == 259).sum()) == 3
    assert len(sample) == sample.input_ids.numel()
    assert sample.pixel_values.shape == (3, 3, 28, 28)
    assert sample.pixel_values.dtype == torch.float32
    torch.testing.assert_close(sample.pixel_values, image_to_tensor(dynamic_tiles(WIDE, 28)))


def test_processor_labels_cover_every_answer_and_only_answers(processor):
    sample = processor([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Count: <image> and <image>"},
        {"role": "assistant", "content": "Two."},
        {"role": "user", "content": "Sure?"},
        {"role": "assistant", "content": "Yes, é!"},
    ], images=[TALL, WIDE])
    assert decoded(processor, sample.input_ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        f"<|im_start|>user\nCount: {FOUR_TILES} and {THREE_TILES}<|im_end|>\n"
        "<|im_start|>assistant\nTwo.<|im_end|>\n"
        "<|im_start|>user\nSure?<|im_end|>\n"
        "<|im_start|>assistant\nYes, é!<|im_end|>\n")
    assert sample.num_tiles == [4, 3]
    assert sample.pixel_values.shape == (7, 3, 28, 28)
    assert labelled_text(processor, sample) == "Two.<|im_end|>Yes, é!<|im_end|>"
    # Labelled tokens are the input tokens at the same positions (the model shifts them).
    mask = sample.labels != IGNORE_INDEX
    assert torch.equal(sample.labels[mask], sample.input_ids[mask])
    # Two contiguous runs: one per answer.
    assert int((mask[1:] & ~mask[:-1]).sum()) == 2


def test_processor_prepends_image_placeholder(processor):
    sample = processor([{"from": "human", "value": "Describe."},
                        {"from": "gpt", "value": "Noise."}], images=WIDE)
    assert decoded(processor, sample.input_ids).startswith(
        f"<|im_start|>user\n{THREE_TILES}\nDescribe.<|im_end|>\n")


def test_processor_placeholder_count_mismatch(processor):
    two_placeholders = [{"from": "human", "value": "<image> vs <image>"}]
    with pytest.raises(ValueError, match=r"2 '<image>' placeholder\(s\).*but 1 image\(s\)"):
        processor(two_placeholders, images=[WIDE])
    with pytest.raises(ValueError, match=r"1 '<image>' placeholder\(s\).*but 2 image\(s\)"):
        processor([{"from": "human", "value": "<image> only"}], images=[WIDE, TALL])
    with pytest.raises(ValueError, match=r"1 '<image>' placeholder\(s\).*but 0 image\(s\)"):
        processor([{"from": "human", "value": "<image> only"}])
    with pytest.raises(ValueError, match="no user turn"):
        processor([{"from": "gpt", "value": "Hi"}], images=[WIDE])


def test_processor_rejects_image_token_in_text(processor):
    with pytest.raises(ValueError, match=r"conversation\[1\].*'<\|vision_pad\|>'"):
        processor([{"from": "human", "value": "hi"}, {"from": "gpt", "value": f"x{PAD}"}])


def test_processor_rejects_bad_turns(processor):
    with pytest.raises(ValueError, match=r"conversation\[0\].*got 'bot'"):
        processor([{"from": "bot", "value": "hi"}])
    with pytest.raises(ValueError, match=r"conversation\[0\].*got \['gpt'\]"):   # unhashable
        processor([{"from": ["gpt"], "value": "hi"}])
    with pytest.raises(TypeError, match=r"conversation\[0\].*got int"):
        processor([{"from": "human", "value": 3}])
    with pytest.raises(TypeError, match="conversation: expected a list of turns"):
        processor("hello")


def test_processor_text_only_and_no_answer(processor):
    sample = processor([{"from": "human", "value": "Hi"}])
    assert decoded(processor, sample.input_ids) == "<|im_start|>user\nHi<|im_end|>\n"
    assert bool((sample.labels == IGNORE_INDEX).all())
    assert sample.pixel_values.shape == (0, 3, 28, 28)
    assert sample.num_tiles == [] and sample.num_image_tokens == 0


def test_processor_prompt_for_generation(processor, tmp_path):
    path = tmp_path / "wide.png"
    WIDE.save(path)
    sample = processor.prompt("What is this?", images=[path], system="Be brief.")
    assert decoded(processor, sample.input_ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        f"<|im_start|>user\n{THREE_TILES}\nWhat is this?<|im_end|>\n<|im_start|>assistant\n")
    assert bool((sample.labels == IGNORE_INDEX).all())
    assert sample.num_tiles == [3]


def test_processor_max_tiles_override_and_config_tags():
    processor = NVLMProcessor.from_config(small_config(thumbnail_tag="<tile_global>"))
    pretrain = processor.prompt("<image>", images=[WIDE], max_tiles=1)
    assert sample_text(processor, pretrain) == (
        f"<|im_start|>user\n<Image><tile_global>{PAD}</Image><|im_end|>\n<|im_start|>assistant\n")
    assert pretrain.num_tiles == [1] and pretrain.pixel_values.shape[0] == 1

    no_thumbnail = NVLMProcessor.from_config(small_config(use_thumbnail=False))
    sample = no_thumbnail.prompt("<image>", images=[WIDE])
    assert sample.num_tiles == [2]
    assert f"<Image><tile_1>{PAD}<tile_2>{PAD}</Image>" in sample_text(no_thumbnail, sample)
    # A lone tile is the whole image: tagged as the thumbnail even without thumbnails.
    assert f"<Image><tile_global_thumbnail>{PAD}</Image>" in sample_text(
        no_thumbnail, no_thumbnail.prompt("<image>", images=[WIDE], max_tiles=1))


def sample_text(processor: NVLMProcessor, sample: ProcessedSample) -> str:
    return decoded(processor, sample.input_ids)


def test_processor_tokens_per_tile_from_config():
    processor = NVLMProcessor.from_config(NVLMConfig.from_preset("tiny"))   # 112 px, 16 tokens
    sample = processor.prompt("<image>", images=[noise_image(112, 112)])
    assert sample.num_tiles == [1]
    assert sample_text(processor, sample) == (
        f"<|im_start|>user\n<Image><tile_global_thumbnail>{PAD * 16}</Image><|im_end|>\n"
        "<|im_start|>assistant\n")
    assert sample.pixel_values.shape == (1, 3, 112, 112)


def test_processor_config_checks():
    with pytest.raises(ValueError, match="image_token_id: expected config.image_token_id 151654, "
                                         "got 259"):
        NVLMProcessor(ByteTokenizer(), NVLMConfig.from_preset("1b"))
    with pytest.raises(ValueError, match="vocab_size: expected at most .* 100, got 264"):
        config = small_config()
        config.llm.vocab_size = 100
        NVLMProcessor(ByteTokenizer(), config)


def test_processor_with_hf_tokenizer(tmp_path):
    from test_tokenizer import CHATML, write_tokenizer_json

    write_tokenizer_json(tmp_path, CHATML + ["<|vision_pad|>"])
    tokenizer = HFTokenizer.from_dir(tmp_path)
    config = small_config(image_token_id=tokenizer.image_token_id)
    config.llm.vocab_size = 512
    processor = NVLMProcessor(tokenizer, config)
    sample = processor([{"from": "human", "value": "<image>\nwhat is in the image"},
                        {"from": "gpt", "value": "a cat on a mat"}], images=[WIDE])
    assert decoded(processor, sample.input_ids) == (
        f"<|im_start|>user\n{THREE_TILES}\nwhat is in the image<|im_end|>\n"
        "<|im_start|>assistant\na cat on a mat<|im_end|>\n")
    assert labelled_text(processor, sample) == "a cat on a mat<|im_end|>"
    assert int((sample.input_ids == tokenizer.image_token_id).sum()) == 3


# --- Packing ------------------------------------------------------------------------------------

def test_pack_samples(processor):
    first = processor([{"from": "human", "value": "<image>A"}, {"from": "gpt", "value": "B"}],
                      images=[WIDE])
    second = processor([{"from": "human", "value": "text only"}, {"from": "gpt", "value": "ok"}])
    third = processor.prompt("<image>", images=[TALL])
    batch = pack_samples([first, second, third])
    lengths = [len(first), len(second), len(third)]
    assert batch.cu_seqlens.dtype == torch.int32
    assert batch.cu_seqlens.tolist() == [0, lengths[0], lengths[0] + lengths[1], sum(lengths)]
    assert batch.max_seqlen == max(lengths)
    assert batch.num_samples == 3 and len(batch) == sum(lengths)
    assert batch.position_ids.dtype == torch.int64
    assert batch.position_ids.tolist() == [p for n in lengths for p in range(n)]
    assert torch.equal(batch.input_ids, torch.cat([first.input_ids, second.input_ids,
                                                   third.input_ids]))
    assert torch.equal(batch.labels, torch.cat([first.labels, second.labels, third.labels]))
    assert batch.num_tiles == [3, 4]
    assert batch.pixel_values.shape == (7, 3, 28, 28)
    assert torch.equal(batch.pixel_values[:3], first.pixel_values)
    assert torch.equal(batch.pixel_values[3:], third.pixel_values)

    moved = batch.to("cpu")
    assert moved.max_seqlen == batch.max_seqlen and moved.num_tiles == batch.num_tiles
    assert torch.equal(moved.cu_seqlens, batch.cu_seqlens)


def test_pack_samples_errors(processor):
    with pytest.raises(ValueError, match="at least one sample"):
        pack_samples([])
    other = NVLMProcessor.from_config(NVLMConfig.from_preset("tiny"))
    with pytest.raises(ValueError, match="one tile shape"):
        pack_samples([processor.prompt("hi"), other.prompt("hi")])


# --- CLI ----------------------------------------------------------------------------------------

def test_cli_tiles_table_and_png(tmp_path, capsys):
    image_path, out_path = tmp_path / "photo.png", tmp_path / "tiles.png"
    noise_image(1000, 500).save(image_path)
    assert cli_main(["tiles", str(image_path), "--out", str(out_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "1000x500" in lines[0]
    assert lines[1].startswith("grid: 2x1 (cols x rows) + thumbnail = 3 tile(s) of 448x448")
    rows = [line.split(None, 2) for line in lines[3:6]]
    assert rows == [["0", "<tile_1>", "(0, 0, 500, 500)"],
                    ["1", "<tile_2>", "(500, 0, 1000, 500)"],
                    ["2", "<tile_global_thumbnail>", "(0, 0, 1000, 500)  (whole image, squashed)"]]
    with Image.open(out_path) as drawn:
        assert drawn.format == "PNG" and drawn.size == (1000, 500)
        assert drawn.convert("RGB").getpixel((500, 250)) == (255, 0, 0)   # the grid line


def test_cli_tiles_options(tmp_path, capsys):
    image_path = tmp_path / "photo.png"
    noise_image(640, 480).save(image_path)
    assert cli_main(["tiles", str(image_path), "--tile-size", "28", "--max-tiles", "2",
                     "--no-thumbnail"]) == 0
    out = capsys.readouterr().out
    assert "grid: 1x1 (cols x rows) = 1 tile(s) of 28x28" in out
    assert "<tile_global_thumbnail>  (0, 0, 640, 480)" in out


def test_cli_tiles_per_architecture(tmp_path, capsys):
    image_path = tmp_path / "photo.png"
    noise_image(1000, 500).save(image_path)
    expected = {
        "D": ["decoder: tag + image tokens"] * 3,
        "X": ["X-attn memory (the tag stays in the text and sees this tile only)"] * 3,
        "H": ["X-attn memory, after embed(tag)"] * 2 + ["decoder: tag + image tokens"],
    }
    for arch, destinations in expected.items():
        assert cli_main(["tiles", str(image_path), "--arch", arch]) == 0
        rows = capsys.readouterr().out.splitlines()[3:6]
        assert [row.split(f"-> NVLM-{arch} ")[1] for row in rows] == destinations


def test_cli_errors_exit_2_without_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    for path in (bad, tmp_path / "missing.png"):
        assert cli_main(["tiles", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and path.name in err and len(err.splitlines()) == 1
    # The same through the interpreter: `python -m nvlm` exits with the code.
    result = subprocess.run([sys.executable, "-m", "nvlm", "tiles", str(bad)],
                            capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
