"""The vision warm-up: per-token OCR labels through the dynamic tiling, the synthetic task's glyph
boxes, and the trainer's `vision` stage (learns, resumes exactly, refuses data without glyphs)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from nvlm import recipes
from nvlm.demo import synth
from nvlm.config import NVLMConfig
from nvlm.images import dynamic_tiles
from nvlm.train import build_config, train
from nvlm.demo.warmup import IGNORE, NO_LABEL, parse_glyphs, token_labels

TINY = NVLMConfig.from_preset("tiny")       # 112-px tiles, 4 x 4 tokens of 28 px


def box(char: str, cx: float, cy: float) -> tuple[str, float, float, float, float]:
    return (char, cx - 4, cy - 5, cx + 4, cy + 5)


def test_token_labels_of_a_hand_built_layout():
    # 224 x 112 -> a 2 x 1 grid + the thumbnail (the whole image squashed to 112 x 112).
    glyphs = [box("1", 42, 70), box("2", 126, 14), box("3", 154, 14)]
    ordinal, char = token_labels(glyphs, (224, 112), TINY, max_tiles=6)
    assert ordinal.shape == char.shape == (3, 16)
    want_ordinal = np.full((3, 16), NO_LABEL)
    want_char = np.full((3, 16), NO_LABEL)
    # Tile 0: "1" in cell row 2, col 1. Tile 1: "2" and "3" in cells (0, 0) and (0, 1).
    for tile, cell, k, c in [(0, 9, 1, "1"), (1, 0, 2, "2"), (1, 1, 3, "3")]:
        want_ordinal[tile, cell], want_char[tile, cell] = k, ord(c) + 1
    # Thumbnail (x halved): "1" at x 21 -> col 0, row 2; "2" (x 63) and "3" (x 77) share col 2.
    want_ordinal[2, 8], want_char[2, 8] = 1, ord("1") + 1
    want_ordinal[2, 2] = want_char[2, 2] = IGNORE
    np.testing.assert_array_equal(ordinal.numpy(), want_ordinal)
    np.testing.assert_array_equal(char.numpy(), want_char)

    # One tile (max_tiles = 1): the whole image, squashed, no thumbnail.
    ordinal, char = token_labels(glyphs, (224, 112), TINY, max_tiles=1)
    assert ordinal.shape == (1, 16) and ordinal[0, 8] == 1 and ordinal[0, 2] == IGNORE


def test_synthetic_glyph_boxes_label_the_cells_that_hold_ink():
    spec = synth.TaskSpec().validate()
    rng = random.Random(11)
    for _ in range(20):
        image, code, glyphs = synth.render(rng, spec)
        assert "".join(g[0] for g in glyphs) == code and len(code) == spec.digits
        tiles = dynamic_tiles(image, TINY.tile_size, 6, TINY.use_thumbnail)
        ordinal, char = token_labels(glyphs, image.size, TINY, max_tiles=6)
        regular = len(tiles) - 1
        labelled = [(t, c) for t in range(regular) for c in range(16) if ordinal[t, c] > NO_LABEL]
        # One token per glyph, on one token row of one tile, in reading order.
        assert sorted(int(ordinal[t, c]) for t, c in labelled) == list(range(1, spec.digits + 1))
        assert len({t for t, _ in labelled}) == 1 and len({c // 4 for _, c in labelled}) == 1
        for t in range(regular):
            pixels = np.asarray(tiles[t].convert("L"), dtype=np.int32)
            for c in range(16):
                cell = pixels[(c // 4) * 28:(c // 4 + 1) * 28, (c % 4) * 28:(c % 4 + 1) * 28]
                has_ink = cell.min() < cell.max() - 60
                if ordinal[t, c] > NO_LABEL:
                    assert has_ink, (code, t, c)
                    assert chr(int(char[t, c]) - 1) == code[int(ordinal[t, c]) - 1]
                else:
                    assert not has_ink, (code, t, c)   # one glyph per cell, no spill-over


def test_parse_glyphs_rejects_malformed_entries():
    assert parse_glyphs([["7", 1, 2, 3, 4]], "f:1") == [("7", 1.0, 2.0, 3.0, 4.0)]
    bad_values = ([["77", 1, 2, 3, 4]], [["7", 3, 2, 1, 4]], [["7", 1, 2, 3]], "7",
                  [[7, 1, 2, 3, 4]])
    for bad in bad_values:
        with pytest.raises(ValueError, match="glyphs"):
            parse_glyphs(bad, "f:1")


def test_vision_recipe_trains_only_the_vit():
    for arch in ("D", "X", "H"):
        assert recipes.recipe(arch, "vision", "tiny").trained == ("vision",)


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> dict[str, Path]:
    return synth.write_task(tmp_path_factory.mktemp("task"), train_n=24, eval_n=2, seed=3)


def vision_args(task, out, **extra) -> dict:
    args = {"data": f"{task['train']}:0.8,{task['text']}:0.2", "out": str(out),
            "stage": "vision", "steps": 6, "global_batch": 8, "warmup_steps": 1,
            "save_every": 3, "log_every": 1, "seed": 2, "eval_n": 0}
    args.update(extra)
    return args


def metrics(out: Path) -> list[dict]:
    with open(out / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_vision_stage_lowers_its_loss_and_resumes_exactly(tmp_path, task):
    straight = tmp_path / "straight"
    summary = train(build_config(vision_args(task, straight, steps=30, save_every=100)))
    # The summary's loss fields are the language model's: none here; the warm-up is apart.
    assert summary["train_loss_first"] is None and 0.0 <= summary["vision_glyph_accuracy"] <= 1.0
    rows = metrics(straight)
    assert all(0.0 <= r["glyph_accuracy"] <= 1.0 for r in rows if r["glyph_tokens"])
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-5:]) / 5
    assert last < 0.5 * first, (first, last)

    full, killed = tmp_path / "full", tmp_path / "killed"
    train(build_config(vision_args(task, full)))
    train(build_config(vision_args(task, killed, stop_at_step=3)))
    train(build_config(vision_args(task, killed, resume=True)))
    assert [r["loss"] for r in metrics(killed)] == [r["loss"] for r in metrics(full)]


def test_vision_stage_needs_glyph_boxes(tmp_path, task):
    with pytest.raises(ValueError, match="glyphs"):
        train(build_config(vision_args(task, tmp_path / "run", data=str(task["text"]))))
