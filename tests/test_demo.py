"""The default demo's own pieces: the text warm-up's recall documents, the demo's stage list run
end to end (scaled down) with a resume across the text warm-up, and the no-tile-tags ablation."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from nvlm import recipes
from nvlm.demo import synth
from nvlm.config import NVLMConfig
from nvlm.model import NVLM
from nvlm.processing import NVLMProcessor
from nvlm.train import StageConfig, TrainConfig, build_config, train, validate_config


def test_recall_documents_hide_one_code_and_grow():
    rng = random.Random(0)
    sizes = [0.0] * 50 + [0.5] * 200 + [1.0] * 500
    docs = [synth.recall_document(rng, size, digits=3) for size in sizes]
    for (text, code), size in zip(docs, sizes):
        # the code is the document's only run of more than one digit, and it is there once
        assert re.findall(r"\d{2,}", text) == [code], (text, code)
        assert len(code) == 3 and code.isdigit()
        if size == 0.0:   # the curriculum's start: the bare code, at most one filler character
            assert code in text and len(text) <= 4 and "\n" not in text
    full = [text for (text, _), size in zip(docs, sizes) if size == 1.0]
    assert max(len(t.splitlines()) for t in full) == 9
    assert max(len(line) for t in full for line in t.splitlines()) > 20
    assert any(re.search(r"(?<!\d)\d(?!\d)", t) for t in full)   # lone distractor digits


def test_recall_split_is_a_curriculum_the_processor_reads(tmp_path):
    path = synth.write_recall_split(tmp_path, 400, seed=4, spec=synth.TaskSpec(digits=4))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 400
    lengths = [len(line["conversations"][0]["value"]) for line in lines]
    ramp = int(synth.RECALL_RAMP * 400)
    assert sum(lengths[:20]) < sum(lengths[ramp:ramp + 20]) / 3   # small first
    processor = NVLMProcessor.from_config(NVLMConfig.from_preset("tiny"))
    sample = processor(lines[-1]["conversations"])
    answer = lines[-1]["conversations"][1]["value"]
    assert len(answer) == 4 and synth.RECALL_QUESTION in lines[-1]["conversations"][0]["value"]
    labelled = [t for t, label in zip(sample.input_ids, sample.labels) if label != -100]
    assert processor.tokenizer.decode(labelled).strip() == answer


def test_text_recipe_trains_only_the_llm():
    for arch in ("D", "X", "H"):
        assert recipes.recipe(arch, "text", "tiny").trained == ("llm",)


@pytest.mark.slow
def test_demo_stages_run_in_order_and_resume_across_the_text_warmup(tmp_path):
    # The default demo (no --data, no --stage) with every stage cut to 2 steps.
    def args(out, **extra):
        return {"out": str(out), "synth_train": 24, "eval_n": 2, "steps": 2, "global_batch": 2,
                "seq_len": 320, "warmup_steps": 1, "save_every": 100, "log_every": 1, **extra}

    config = build_config(args(tmp_path / "straight"))
    assert [(s.name, s.stage) for s in config.stages] == [
        ("vision", "vision"), ("text", "text"), ("pretrain", "pretrain"), ("sft", "sft")]
    summary = train(config)
    saved = json.loads((tmp_path / "straight" / "config.json").read_text())["train"]
    text_stage = next(s for s in saved["stages"] if s["name"] == "text")
    assert Path(text_stage["data"]).name == "recall.jsonl"
    assert saved["data"].count("recall.jsonl") == 0       # the image stages never read it
    assert list(summary["stage_losses"]) == ["vision", "text", "pretrain", "sft"]
    rows = [json.loads(line) for line in open(tmp_path / "straight" / "metrics.jsonl")]
    assert [r["stage"] for r in rows] == ["vision"] * 2 + ["text"] * 2 + ["pretrain"] * 2 + ["sft"] * 2
    assert all(r["tokens"] > 0 and r["loss"] > 0 for r in rows)

    # the run's train_loss is on its own data: the warm-ups' losses are apart, in stage_losses
    assert summary["train_loss_first"] == summary["stage_losses"]["pretrain"]["first"]
    assert 0.0 <= summary["vision_glyph_accuracy"] <= 1.0

    killed = tmp_path / "killed"
    train(build_config(args(killed, stop_at_step=3)))          # in the middle of the text stage
    again = train(build_config(args(killed, resume=True)))
    resumed = [json.loads(line)["loss"] for line in open(killed / "metrics.jsonl")]
    assert resumed == [r["loss"] for r in rows]
    for key in ("train_loss_first", "train_loss_final", "stage_losses", "vision_glyph_accuracy",
                "padding_fraction", "eval_exact_match", "eval_exact_match_blank"):
        assert again[key] == summary[key], key


def test_no_tile_tags_leaves_the_tags_out_for_nvlm_d_only():
    tagged = NVLMProcessor.from_config(NVLMConfig.from_preset("tiny"))
    config = NVLMConfig.from_preset("tiny")
    config.tile_tags = False
    untagged = NVLMProcessor.from_config(config.validate())
    layout = untagged.image_layout(7)
    text = layout.pieces[0][0]
    assert "<tile_" not in text and text.startswith("<Image>") and text.endswith("</Image>")
    assert text.count(untagged.tokenizer.image_token) == 7 * config.tokens_per_tile
    assert tagged.image_layout(7).pieces[0][0].count("<tile_") == 7
    for arch in ("X", "H"):
        other = NVLMConfig.from_preset("tiny", arch=arch)
        other.tile_tags = False
        with pytest.raises(ValueError, match="tile_tags"):
            other.validate()
    with pytest.raises(ValueError, match="--no-tile-tags"):
        build_config({"arch": "X", "no_tile_tags": True})


def test_a_model_without_tile_tags_reloads_without_them(tmp_path):
    config = NVLMConfig.from_preset("tiny")
    config.tile_tags = False
    model = NVLM(config.validate())
    model.init_weights()   # a fresh module's storage is uninitialised: the loader checks finiteness
    model.save_pretrained(tmp_path / "model")
    assert NVLM.from_pretrained(tmp_path / "model").config.tile_tags is False


def test_stage_names_must_differ():
    # metrics rows, stage_losses and checkpoints go by the stage's name
    config = TrainConfig(stages=[StageConfig(name="s", stage="pretrain"),
                                 StageConfig(name="s", stage="sft")])
    with pytest.raises(ValueError, match="its own name"):
        validate_config(config)


def test_plot_series_draws_each_curve_in_its_colour(tmp_path):
    from PIL import Image

    from nvlm.plot import _COLOURS, plot_series

    path = tmp_path / "curves.png"
    plot_series([("a", [(1, 2.0), (50, 0.5), (100, 0.01)]), ("b", [(1, 1.5), (100, 0.2)]),
                 ("empty", [(1, 0.0), (2, float("nan"))])], path, "loss")
    image = Image.open(path).convert("RGB")
    colours = {colour for _, colour in image.getcolors(maxcolors=1 << 20)}
    assert image.size == (900, 500) and _COLOURS[0] in colours and _COLOURS[1] in colours
