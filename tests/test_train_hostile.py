"""The trainer against hostile but realistic use: bad flags are refused before anything trains, a
diverging step stops the run without overwriting the last good checkpoint, and resume survives a
corrupt newest checkpoint, a torn metrics line, changed flags, leftovers of a kill and a second
run on the same folder. Atomic writes fsync before they rename."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

from nvlm import files, train as trainer
from nvlm.stages import LanguageModelStage
from nvlm.train import RunDiverged, build_config, main, train
from test_train import losses, task  # noqa: F401  (task: the module's synthetic-data fixture)
from test_train import run_args as train_run_args


def run_args(task, out, **extra) -> dict:
    """test_train's few-second run (4 steps, a checkpoint every 2), with `extra`."""
    return train_run_args(task, out, **{"eval_n": 2, **extra})


def argv(args: dict) -> list[str]:
    out = []
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is not None:
            out += [flag, str(value)]
    return out


@pytest.fixture(scope="module")
def straight(task, tmp_path_factory) -> list[float]:
    """The losses of an uninterrupted run: what every resume below must reproduce."""
    out = tmp_path_factory.mktemp("straight") / "run"
    train(build_config(run_args(task, out)))
    return losses(out)


# --------------------------------------------------------------------------------------------
# flags


@pytest.mark.parametrize("extra,flag", [
    ({"grad_clip": -1}, "--grad-clip"),
    ({"grad_clip": "nan"}, "--grad-clip"),
    ({"micro_batch": -1}, "--micro-batch"),
    ({"micro_batch": 0}, "--micro-batch"),
    ({"lr": "inf"}, "--lr"),
    ({"lr": "nan"}, "--lr"),
    ({"weight_decay": "nan"}, "--weight-decay"),
    ({"save_every": 0}, "--save-every"),
    ({"log_every": 0}, "--log-every"),
    ({"steps": 0}, "--steps"),
    ({"warmup_steps": -1}, "--warmup-steps"),
    ({"max_tiles": 1_000_000}, "--max-tiles"),
    ({"init": "/nonexistent/checkpoint"}, "--init"),
    ({"eval_data": "/nonexistent.jsonl"}, "--eval-data"),
    ({"image_root": "/nonexistent/images"}, "--image-root"),
    ({"data": "/nonexistent.jsonl"}, "--data"),
])
def test_bad_flags_are_refused_before_anything_runs(task, tmp_path, capsys, extra, flag):
    out = tmp_path / "run"
    assert main(argv(run_args(task, out, **extra))) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and flag in lines[0], lines
    assert not out.exists()   # refused before the run folder was even made


def test_out_naming_a_file_and_cuda_without_a_gpu_are_refused(task, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(argv(run_args(task, a_file))) == 2
    assert "--out" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(argv(run_args(task, tmp_path / "run", device="cuda"))) == 2
        assert "--device cuda" in capsys.readouterr().err


def test_config_file_values_of_the_wrong_type_are_refused(task, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('seed = "five"\n')
    with pytest.raises(ValueError, match="--seed"):
        build_config({"config": str(config)})
    config.write_text('[[stages]]\nname = "s"\nstage = "sft"\nsteps = "ten"\n')
    with pytest.raises(ValueError, match="--steps"):
        build_config({"config": str(config), "data": run_args(task, "x")["data"]})


def test_a_bug_keeps_its_traceback_and_debug_shows_a_refusals(task, tmp_path, monkeypatch):
    def buggy(config):
        raise KeyError("a bug")
    monkeypatch.setattr(trainer, "train", buggy)
    with pytest.raises(KeyError):
        main(argv(run_args(task, tmp_path / "run")))
    with pytest.raises(ValueError, match="--micro-batch"):
        main(argv(run_args(task, tmp_path / "run", micro_batch=0, debug=True)))


def test_a_non_finite_step_stops_the_run_and_keeps_the_last_good_checkpoint(task, tmp_path,
                                                                            monkeypatch, capsys):
    out = tmp_path / "run"
    real_step, calls = LanguageModelStage.step, []

    def diverging_step(self):
        result = real_step(self)
        calls.append(result.loss)
        return dataclasses.replace(result, loss=float("nan")) if len(calls) == 3 else result

    monkeypatch.setattr(LanguageModelStage, "step", diverging_step)
    assert main(argv(run_args(task, out))) == 1
    message = capsys.readouterr().err
    assert "step 3" in message and "not finite" in message and "step-0000002" in message
    checkpoints = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert checkpoints == ["step-0000002"]
    assert (out / "checkpoints" / "latest").read_text() == "step-0000002"
    assert not (out / "model").exists()
    with pytest.raises(RunDiverged):   # the same through the API
        calls.clear()
        train(build_config(run_args(task, tmp_path / "again")))


# --------------------------------------------------------------------------------------------
# resume


def _kill_at(task, out: Path, step: int, **extra) -> None:
    train(build_config(run_args(task, out, stop_at_step=step, **extra)))


def test_resume_passes_over_an_unreadable_newest_checkpoint_and_a_torn_metrics_line(
        task, tmp_path, straight, caplog):
    out = tmp_path / "run"
    _kill_at(task, out, 4, steps=6)
    (out / "checkpoints" / "step-0000004" / "state.pt").write_bytes(b"\x00" * 100)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "stage": "sft", "lo')   # cut mid-line by the kill
    caplog.set_level("WARNING", logger="nvlm.train")
    train(build_config(run_args(task, out, steps=6, resume=True)))
    assert "step-0000004" in caplog.text and "unreadable" in caplog.text
    assert len(losses(out)) == 6
    # resumed from step 2: its steps 3 and 4 are those of a straight 6-step run
    six = tmp_path / "six"
    train(build_config(run_args(task, six, steps=6)))
    assert losses(out) == losses(six)


def test_resume_reads_the_runs_own_configuration(task, tmp_path, straight):
    out = tmp_path / "run"
    _kill_at(task, out, 2)
    train(build_config({"out": str(out), "resume": True}))    # no other flag: the README's form
    assert losses(out) == straight


def test_resume_refuses_changed_settings_unless_allowed(task, tmp_path):
    out = tmp_path / "run"
    _kill_at(task, out, 2)
    with pytest.raises(ValueError, match=r"lr: None -> 0\.002"):
        build_config({"out": str(out), "resume": True, "lr": 0.002})
    with pytest.raises(ValueError, match="data"):
        build_config({"out": str(out), "resume": True, "data": str(task["train"])})
    with pytest.raises(ValueError, match="stages differ"):
        build_config({"out": str(out), "resume": True, "stage": "pretrain"})
    # settings that do not change what is computed are free
    build_config({"out": str(out), "resume": True, "log_every": 3, "eval_n": 1})
    config = build_config({"out": str(out), "resume": True, "lr": 0.002,
                           "allow_config_change": True})
    train(config)
    recorded = json.loads((out / "config.json").read_text())["train"]
    assert recorded["resume_changes"] == ["stages[0].lr: None -> 0.002"]


def test_resume_removes_what_a_kill_left_and_a_second_run_is_refused(task, tmp_path, straight,
                                                                     caplog):
    out = tmp_path / "run"
    _kill_at(task, out, 2)
    leftovers = [out / "checkpoints" / f".step-0000003.tmp-{'a' * 32}",
                 out / f".metrics.jsonl.tmp-{'b' * 32}"]
    leftovers[0].mkdir()
    leftovers[1].write_text("half")
    with files.RunLock(out):   # a live run holds the folder
        with pytest.raises(ValueError, match="another run is writing there"):
            train(build_config(run_args(task, out, resume=True)))
    assert all(p.exists() for p in leftovers)   # the refused run touched nothing
    # a lock left by a run that died (its content stays, nobody holds the flock) is taken over
    (out / ".lock").write_text(json.dumps({"pid": 999999, "host": "gone", "started": "then"}))
    caplog.set_level("INFO", logger="nvlm.train")
    train(build_config(run_args(task, out, resume=True)))
    assert not any(p.exists() for p in leftovers)
    assert "taking over the lock" in caplog.text and "999999" in caplog.text
    assert losses(out) == straight
    assert (out / ".lock").read_text() == ""   # released


# --------------------------------------------------------------------------------------------
# atomic writes


def test_atomic_writes_fsync_the_data_and_the_folder_before_and_after_the_rename(tmp_path,
                                                                                 monkeypatch):
    synced, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def replace(src, dst):
        synced.append(("rename", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    files.write_text_atomic(tmp_path / "f.txt", "data")
    rename = synced.index(("rename", str(tmp_path / "f.txt")))
    assert any(".f.txt.tmp-" in str(p) for p in synced[:rename])     # the data, before
    assert str(tmp_path) in synced[rename + 1:]                     # the folder, after
    synced.clear()
    with files.atomic_directory(tmp_path / "d") as tmp:
        (tmp / "state.pt").write_bytes(b"x")
    rename = synced.index(("rename", str(tmp_path / "d")))
    assert any(str(p).endswith("state.pt") for p in synced[:rename])
    assert str(tmp_path) in synced[rename + 1:]
