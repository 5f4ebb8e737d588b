"""The trainer: recipes and freeze sets, the schedule, packing, bad data, resume equivalence,
2-process FSDP2 == 1 process, and a short end-to-end run that lowers the loss."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nvlm import recipes
from nvlm.demo import synth
from nvlm.config import NVLMConfig
from nvlm.data import RowPacker, SampleStream, parse_data_spec
from nvlm.model import NVLM
from nvlm.packing import pack_samples
from nvlm.processing import NVLMProcessor
from nvlm.train import build_config, build_optimizer, lr_at, train

REPO = Path(__file__).resolve().parent.parent
SMALL_TASK = synth.TaskSpec(canvas=(224, 112), font_sizes=(14, 16), digits=3)


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> dict[str, Path]:
    return synth.write_task(tmp_path_factory.mktemp("task"), train_n=48, eval_n=6, seed=1,
                            spec=SMALL_TASK)


def run_args(task, out, **extra) -> dict:
    """A few-second run: 2 rows of 200 tokens per step on the tiny model."""
    args = {"data": f"{task['train']}:0.8,{task['text']}:0.2", "eval_data": str(task["eval"]),
            "out": str(out), "stage": "sft", "steps": 4, "global_batch": 2, "seq_len": 200,
            "warmup_steps": 1, "eval_n": 3, "save_every": 2, "log_every": 1, "seed": 5}
    args.update(extra)
    return args


def losses(out: Path) -> list[float]:
    with open(out / "metrics.jsonl") as f:
        return [json.loads(line)["loss"] for line in f]


def tiny_model() -> NVLM:
    torch.manual_seed(0)
    model = NVLM(NVLMConfig.from_preset("tiny"))
    model.init_weights()
    return model


@pytest.mark.parametrize("stage,trained", [("pretrain", {"mlp1"}),
                                           ("sft", {"mlp1", "language_model"})])
def test_nvlm_d_freeze_sets_and_optimizer_state(stage, trained):
    model = tiny_model()
    recipe = recipes.recipe("D", stage, "tiny")
    names = recipes.apply_freeze(model, recipe.trained)
    assert {n.split(".")[0] for n in names} == trained
    assert not any(p.requires_grad for p in model.vision_model.parameters())
    optimizer = build_optimizer(model, recipe)
    ids = torch.randint(0, 256, (1, 40))
    ids[0, 5:5 + model.config.tokens_per_tile] = model.config.image_token_id
    model(ids, torch.randn(1, 3, 112, 112), labels=ids).loss.backward()
    optimizer.step()
    with_state = {id(p) for p in optimizer.state}
    for name, p in model.named_parameters():
        assert (id(p) in with_state) == p.requires_grad, name
        if not p.requires_grad:
            assert p.grad is None, name
    # No weight decay on 1-D parameters (norms, biases, LayerScale, gates).
    for group in optimizer.param_groups:
        if group["weight_decay"]:
            assert all(p.ndim >= 2 for p in group["params"])


def test_paper_recipes_follow_nvlm_md():
    sft_d = recipes.paper_recipe("D", "sft")
    assert sft_d.trained == ("projector", "llm") and sft_d.lr == 2e-6 and sft_d.seq_len == 3200
    assert recipes.paper_recipe("H", "pretrain").trained == ("xattn", "projector")
    assert recipes.paper_recipe("X", "sft").betas == (0.9, 0.98)
    with pytest.raises(ValueError, match="parts"):
        recipes.apply_freeze(tiny_model(), ("xattn",))     # NVLM-D has no X-attn blocks


def test_cosine_schedule_with_warmup():
    recipe = recipes.StageRecipe(("llm",), 1, 1.0, 0.1, 10, (0.9, 0.95), 0.0, 1.0, 64, 1, 110)
    assert lr_at(0, recipe) == pytest.approx(0.1)
    assert lr_at(9, recipe) == pytest.approx(1.0)
    assert lr_at(60, recipe) == pytest.approx(0.55)
    assert lr_at(109, recipe) == pytest.approx(0.1, abs=1e-3)


def test_packed_loss_equals_the_token_weighted_per_sample_losses(task):
    model = tiny_model()
    processor = NVLMProcessor.from_config(model.config)
    stream = SampleStream(parse_data_spec(f"{task['train']},{task['text']}"), processor, seed=0,
                          max_len=400)
    samples = [next(stream) for _ in range(5)]
    packed = pack_samples(samples)
    out = model(packed.input_ids, packed.pixel_values, packed.labels,
                cu_seqlens=packed.cu_seqlens, position_ids=packed.position_ids)
    total, count = 0.0, 0
    for s in samples:
        alone = model(s.input_ids[None], s.pixel_values if s.num_tiles else None, s.labels[None])
        total += alone.loss * alone.num_label_tokens
        count += alone.num_label_tokens
    assert out.num_label_tokens == count
    # the collator's count (the trainer's normaliser) is the model's: the answers + <|im_end|>
    assert packed.num_targets == count == sum(int((s.labels != -100).sum()) for s in samples)
    torch.testing.assert_close(out.loss, total / count, atol=1e-5, rtol=1e-5)


def test_row_packer_fills_rows_and_resumes_exactly(task):
    processor = NVLMProcessor.from_config(NVLMConfig.from_preset("tiny"))
    specs = parse_data_spec(f"{task['train']}:0.7,{task['text']}:0.3")

    def packer():
        return RowPacker(SampleStream(specs, processor, seed=3, max_len=300), 300)

    a = packer()
    rows = [a.next_row() for _ in range(3)]
    assert all(sum(len(s) for s in row) <= 300 for row in rows)
    state = a.state_dict()
    expected = [[s.input_ids.tolist() for s in a.next_row()] for _ in range(4)]
    b = packer()
    b.load_state_dict(json.loads(json.dumps(state)))   # a checkpoint stores it as plain data
    assert [[s.input_ids.tolist() for s in b.next_row()] for _ in range(4)] == expected


def test_bad_data_is_skipped_and_counted(tmp_path, task):
    lines = [json.loads(line) for line in open(task["train"])][:12]
    for line in lines:
        line["image"] = str(task["train"].parent / line["image"])
    bad = [
        "{not json",
        json.dumps({"conversations": [{"from": "human", "value": "no answer"}]}),
        json.dumps({"image": "missing.png", "conversations": lines[0]["conversations"]}),
        json.dumps({"image": [lines[0]["image"]] * 2, "conversations": lines[0]["conversations"]}),
        json.dumps({"conversations": [{"from": "human", "value": "x" * 500},
                                      {"from": "gpt", "value": "y"}]}),
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join([json.dumps(x) for x in lines] + bad) + "\n")
    processor = NVLMProcessor.from_config(NVLMConfig.from_preset("tiny"))
    stream = SampleStream(parse_data_spec(str(path)), processor, seed=0, max_len=300)
    samples = [next(stream) for _ in range(20)]       # wraps around: epochs continue
    assert len(samples) == 20
    assert stream.skips.counts == {"bad line": 2, "unreadable image": 1, "bad sample": 1,
                                   "longer than a row": 1}

    mostly_bad = tmp_path / "bad.jsonl"
    mostly_bad.write_text("\n".join(["{oops"] * 40 + [json.dumps(lines[0])]) + "\n")
    with pytest.raises(ValueError, match="32 of the first 32 lines are bad"):
        next(SampleStream(parse_data_spec(str(mostly_bad)), processor, seed=0, max_len=300))
    # A wrong image root: every image is missing.
    stream = SampleStream(parse_data_spec(str(task["train"])), processor, seed=0, max_len=300,
                          image_root=tmp_path)
    with pytest.raises(ValueError, match="image-root"):
        next(stream)
    with pytest.raises(ValueError, match="is not a file"):
        parse_data_spec(str(tmp_path / "nope.jsonl"))


@pytest.mark.slow
def test_resume_gives_the_losses_of_an_uninterrupted_run(tmp_path, task):
    straight = train(build_config(run_args(task, tmp_path / "straight")))
    train(build_config(run_args(task, tmp_path / "killed", stop_at_step=2)))
    assert len(losses(tmp_path / "killed")) == 2
    resumed = train(build_config(run_args(task, tmp_path / "killed", resume=True)))
    assert losses(tmp_path / "killed") == losses(tmp_path / "straight")
    assert resumed["eval_exact_match"] == straight["eval_exact_match"]
    for name in ("summary.json", "loss.png", "model/config.json", "model/model.safetensors"):
        assert (tmp_path / "killed" / name).is_file(), name


def test_refuses_to_overwrite_or_to_resume_another_run(tmp_path, task):
    train(build_config(run_args(task, tmp_path / "run", steps=2, stop_at_step=2)))
    with pytest.raises(ValueError, match="--resume"):
        train(build_config(run_args(task, tmp_path / "run", steps=2)))
    with pytest.raises(ValueError, match="stages differ"):
        train(build_config(run_args(task, tmp_path / "run", stage="pretrain", resume=True)))
    with pytest.raises(ValueError, match="no checkpoint"):
        train(build_config(run_args(task, tmp_path / "empty", resume=True)))


def test_config_file_and_flags(tmp_path, task):
    config_file = tmp_path / "run.toml"
    config_file.write_text(f"""
data = "{task['train']}"
seed = 7
[[stages]]
name = "warm"
stage = "pretrain"
steps = 3
[[stages]]
name = "main"
stage = "sft"
lr = 0.002
""")
    config = build_config({"config": str(config_file), "seed": 9, "global_batch": 4})
    assert config.seed == 9 and [s.name for s in config.stages] == ["warm", "main"]
    recipe = config.stages[1].resolve("D", "tiny")
    assert recipe.lr == 0.002 and recipe.global_batch == 4 and recipe.trained == ("projector", "llm")
    assert config.stages[0].resolve("D", "tiny").trained == ("projector",)
    config_file.write_text("bogus_key = 1\n")
    with pytest.raises(ValueError, match="bogus_key"):
        build_config({"config": str(config_file)})


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["D", "H"])   # H: X-attn blocks are FSDP units too
def test_two_process_fsdp_matches_one_process(tmp_path, task, arch):
    args = run_args(task, tmp_path / "one", steps=3, eval_n=2, arch=arch)
    train(build_config(args))

    cli = []
    for key, value in run_args(task, tmp_path / "two", steps=3, eval_n=2, arch=arch).items():
        cli += [f"--{key.replace('_', '-')}", str(value)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             str(REPO / "nvlm" / "train.py"), *cli], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "two")),
                               torch.tensor(losses(tmp_path / "one")), atol=2e-5, rtol=2e-5)


@pytest.mark.slow
def test_short_run_lowers_the_loss(tmp_path, task):
    summary = train(build_config(run_args(task, tmp_path / "run", steps=25, lr=3e-3,
                                          global_batch=4, save_every=100)))
    assert summary["steps"] == 25
    assert summary["train_loss_final"] < 0.6 * summary["train_loss_first"]
    assert 0.0 <= summary["eval_exact_match"] <= 1.0 and summary["eval_n"] == 3


@pytest.mark.parametrize("arch,stage,trained", [("X", "pretrain", {"xattn"}),
                                                ("X", "sft", {"xattn", "language_model"}),
                                                ("H", "pretrain", {"xattn", "mlp1"}),
                                                ("H", "sft", {"xattn", "mlp1", "language_model"})])
def test_nvlm_x_h_freeze_sets(arch, stage, trained):
    torch.manual_seed(0)
    model = NVLM(NVLMConfig.from_preset("tiny", arch=arch))
    model.init_weights()
    names = recipes.apply_freeze(model, recipes.recipe(arch, stage, "tiny").trained)
    assert {n.split(".")[0] for n in names} == trained
    assert not any(p.requires_grad for p in model.vision_model.parameters())


@pytest.mark.parametrize("arch", ["X", "H"])
def test_nvlm_x_h_train_resume_and_reload(tmp_path, task, arch):
    """The trainer runs NVLM-X/H like NVLM-D: packed X-attn inputs, a killed run resumes to the
    same losses, and the saved model reloads as the same architecture."""
    whole = train(build_config(run_args(task, tmp_path / "whole", arch=arch, steps=4)))
    train(build_config(run_args(task, tmp_path / "cut", arch=arch, steps=4, stop_at_step=2)))
    train(build_config(run_args(task, tmp_path / "cut", arch=arch, steps=4, resume=True)))
    assert losses(tmp_path / "cut") == losses(tmp_path / "whole")
    assert whole["steps"] == 4 and whole["eval_n"] == 3
    model = NVLM.from_pretrained(tmp_path / "whole" / "model")
    assert model.config.arch == arch
    gates = [float(block.attn_gate.detach()) for block in model.xattn.values()]
    assert all(g != 0.0 for g in gates)   # the X-attn blocks trained

