"""The NVLM trainer: the paper's staged recipes on packed multimodal data, from a CPU to many GPUs.

Single process (the default demo: synthetic task, tiny NVLM-D, CPU, under 9 minutes on 2 cores):
    python nvlm/train.py
    python -m nvlm.train                                  # the same
One stage of the paper's recipe on your data, from a public checkpoint:
    python nvlm/train.py --init NVLM-D-72B/ --stage sft --data a.jsonl:0.8,b.jsonl:0.2 --out runs/sft
Several processes (FSDP2, one shard unit per ViT/decoder block; gloo on CPU, nccl on GPU):
    torchrun --nproc_per_node 8 nvlm/train.py --preset 1b --stage sft --data train.jsonl --out runs/1b
A config file (TOML, or YAML when PyYAML is installed) holds the same keys; command-line flags win:
    python nvlm/train.py --config run.toml            # top-level keys + [[stages]] tables
Resume a killed run where its last checkpoint left it (same losses as an uninterrupted run); the
run's own saved configuration is the base, and a flag that would change it is refused unless
--allow-config-change says so:
    python nvlm/train.py --out runs/sft --resume

A run is a list of stages (docs/nvlm.md section 9: pretrain trains the projector, SFT the projector and
the LLM; the ViT stays frozen). `--stage` picks one recipe from nvlm.recipes; the default demo chains
several (see demo_stages), starting with our two warm-ups for a from-scratch model: `vision` for the
ViT (one process only) and `text` for the decoder (nvlm.demo.warmup). Each stage kind is an object
of nvlm.stages behind one interface, so one loop runs them all. Stage flags (--steps, --lr, ...)
override every stage of the run.

The run folder (--out) gets: config.json (the resolved run), metrics.jsonl (one line per step),
checkpoints/ (atomic, the latest two kept), model/ (save_pretrained of the final model),
loss.png, and summary.json (steps, first/final train loss on the run's data, each stage's first/final
loss, eval exact match with the images and with blank images, what each stage reports of itself
(padding, the vision warm-up's glyph accuracy), tokens/s, wall seconds). A run holds --out's
lock (.lock) while it writes there.

Every flag is checked before anything trains (one line naming it, exit 2); a step whose loss or
gradient is not finite stops the run (exit 1) before it can overwrite the last good checkpoint.
`--debug` shows the traceback of a refused input; any other error always shows it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):
    # `python nvlm/train.py`: make the package importable as when run with -m.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "nvlm"

import torch  # noqa: E402

from nvlm import recipes  # noqa: E402
from nvlm.config import PRESETS, NVLMConfig  # noqa: E402
from nvlm.data import check_input_file, load_eval_set, parse_data_spec  # noqa: E402
from nvlm.demo.warmup import TextWarmupStage, VisionWarmupStage  # noqa: E402
from nvlm.distributed import (World, full_model_state, full_optimizer_state, init_world,  # noqa: E402
                              load_full_state, shard_model)
from nvlm.errors import InputError  # noqa: E402
from nvlm.files import RunLock, atomic_directory, remove_temporaries, write_text_atomic  # noqa: E402
from nvlm.model import NVLM  # noqa: E402
from nvlm.processing import NVLMProcessor  # noqa: E402
from nvlm.recipes import build_optimizer, lr_at  # noqa: E402
from nvlm.stages import LanguageModelStage, Stage, StageContext  # noqa: E402
from nvlm.tokenizer import load_tokenizer  # noqa: E402

log = logging.getLogger("nvlm.train")

# The class that runs each recipe stage (nvlm.stages): one training loop for all of them.
STAGE_KINDS: dict[str, type] = {"vision": VisionWarmupStage, "text": TextWarmupStage,
                                "pretrain": LanguageModelStage, "sft": LanguageModelStage}

CHECKPOINTS_KEPT = 2


# ---------------------------------------------------------------------------------------------
# Configuration

@dataclass
class StageConfig:
    """One stage of a run: a paper recipe (`stage`) with optional overrides (None = recipe's)."""

    name: str = "sft"
    stage: str = "sft"
    data: str | None = None            # --data spec for this stage; None: the run's data
    trained: tuple[str, ...] | None = None
    steps: int | None = None
    lr: float | None = None
    min_lr: float | None = None
    warmup_steps: int | None = None
    global_batch: int | None = None
    seq_len: int | None = None
    max_tiles: int | None = None
    weight_decay: float | None = None
    grad_clip: float | None = None
    betas: tuple[float, float] | None = None

    def resolve(self, arch: str, preset: str) -> recipes.StageRecipe:
        base = recipes.recipe(arch, self.stage, preset)
        overrides = {f.name: getattr(self, f.name) for f in dataclasses.fields(base)
                     if getattr(self, f.name, None) is not None}
        for key in ("trained", "betas"):
            if key in overrides:
                overrides[key] = tuple(overrides[key])
        return dataclasses.replace(base, **overrides).validate()


@dataclass
class TrainConfig:
    arch: str = "D"
    preset: str = "tiny"
    init: str | None = None            # a checkpoint directory (from_pretrained) to start from
    data: str | None = None            # 'a.jsonl[:w],b.jsonl[:w]'; None: the synthetic task
    eval_data: str | None = None       # held-out JSONL; None: the synthetic task's eval split
    image_root: str | None = None
    out: str | None = None             # run folder; None: runs/<arch>-<preset>-<time>
    resume: bool = False
    seed: int = 0
    device: str = "auto"
    micro_batch: int = 1               # rows per forward pass on each rank
    save_every: int = 100
    log_every: int = 10
    eval_n: int = 200
    eval_batch: int = 50
    max_new_tokens: int = 12
    synth_train: int = 6_000           # samples of the generated synthetic task
    no_tile_tags: bool = False         # a new model without tile tags (NVLM-D; ablation)
    stop_at_step: int | None = None    # end the process after this global step (as if killed)
    allow_config_change: bool = False  # --resume with settings other than the run's own
    resume_changes: list[str] = field(default_factory=list)  # what such a resume changed
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig()])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The default demo (python nvlm/train.py with no arguments): NVLM's staged training in miniature,
# sized for under 9 minutes on 2 CPU cores. The tiny model starts from random weights, not from
# a pretrained ViT and LLM as NVLM does, so two warm-ups come first and stand in for that
# pretraining: `vision` (nvlm.demo.warmup: per-token OCR labels) gives the ViT the reading skill
# InternViT brings, `text` (the synthetic task's recall documents: find a code in a text and copy
# it) gives the decoder the LLM's skill of finding and copying a string from its context. Then
# the paper's stages with their freeze sets (ViT frozen): pretrain (the projector, or NVLM-X/H's
# X-attn), then SFT, whose learning rate decays to the recipe's floor (lr / 10): with the warm-ups
# the decoder leaves the chance plateau within ~500 SFT steps for every seed measured, and a
# higher floor (5e-4, once needed to let late leavers learn) made a run that had reached a loss
# near 0 spike back up at its last steps (Adam on tiny gradients). docs/results.md has the runs.
def demo_stages(arch: str) -> list[StageConfig]:
    return [StageConfig(name="vision", stage="vision"),
            StageConfig(name="text", stage="text", steps=800),
            StageConfig(name="pretrain", stage="pretrain", steps=150),
            StageConfig(name="sft", stage="sft", steps=1200)]


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    parser = argparse.ArgumentParser(prog="nvlm/train.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="TOML (or YAML) file with TrainConfig keys and [[stages]]")
    run = parser.add_argument_group("run")
    run.add_argument("--arch", choices=["D", "X", "H"])
    run.add_argument("--preset", choices=["tiny", "1b", "34b", "72b"])
    run.add_argument("--init", help="checkpoint directory to start from (from_pretrained)")
    run.add_argument("--data", help="training JSONL files: a.jsonl[:weight],b.jsonl[:weight]")
    run.add_argument("--eval-data", help="held-out JSONL for the final exact-match eval")
    run.add_argument("--image-root", help="folder image paths are relative to (default: each file's)")
    run.add_argument("--out", help="run folder")
    run.add_argument("--resume", action="store_true", default=None,
                     help="continue from the run folder's latest checkpoint")
    run.add_argument("--seed", type=int)
    run.add_argument("--device", choices=["auto", "cpu", "cuda"])
    run.add_argument("--micro-batch", type=int, help="rows per forward pass per rank")
    run.add_argument("--save-every", type=int)
    run.add_argument("--log-every", type=int)
    run.add_argument("--eval-n", type=int)
    run.add_argument("--synth-train", type=int, help="samples of the generated synthetic task")
    run.add_argument("--no-tile-tags", action="store_true", default=None,
                     help="new NVLM-D model without the 1-D tile tags (the paper's Table 1 "
                          "baseline)")
    run.add_argument("--allow-config-change", action="store_true", default=None,
                     help="with --resume: continue with settings that differ from the run's own "
                          "(the losses then differ from an uninterrupted run)")
    run.add_argument("--debug", action="store_true", help="tracebacks for refused inputs too")
    run.add_argument("--stop-at-step", type=int, help=argparse.SUPPRESS)
    stage = parser.add_argument_group("stage (override every stage of the run)")
    stage.add_argument("--stage", choices=list(recipes.STAGES),
                       help="run this one stage of the paper's recipe")
    stage.add_argument("--steps", type=int)
    stage.add_argument("--lr", type=float)
    stage.add_argument("--min-lr", type=float)
    stage.add_argument("--warmup-steps", type=int)
    stage.add_argument("--global-batch", type=int, help="packed rows per optimizer step")
    stage.add_argument("--seq-len", type=int, help="tokens per packed row")
    stage.add_argument("--max-tiles", type=int)
    stage.add_argument("--weight-decay", type=float)
    stage.add_argument("--grad-clip", type=float)
    stage.add_argument("--train", dest="trained", help="parts to train, e.g. projector,llm")
    args = parser.parse_args(argv)
    return build_config(vars(args))


def build_config(args: dict[str, Any]) -> TrainConfig:
    """Defaults < the run's saved configuration (with --resume) < config file < command line;
    then the stage list; then every value checked (InputError naming the flag)."""
    values: dict[str, Any] = {}
    file_stages = None
    saved = _saved_run_config(args)
    if saved is not None:
        file_stages = saved["stages"]
        values.update({k: v for k, v in saved.items() if k not in _NOT_INHERITED})
    if args.get("config"):
        file_values = _read_config_file(Path(args["config"]))
        file_stages = file_values.pop("stages", file_stages)
        values.update(file_values)
    run_fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"stages"}
    values.update({k: v for k, v in args.items() if k in run_fields and v is not None})
    unknown = sorted(set(values) - run_fields)
    if unknown:
        raise InputError(f"config: unknown keys {unknown}; known: {sorted(run_fields)}")
    config = TrainConfig(**values)

    stage_fields = {f.name for f in dataclasses.fields(StageConfig)}
    if args.get("stage"):
        stages = [StageConfig(name=args["stage"], stage=args["stage"])]
    elif file_stages is not None:
        stages = []
        for i, entry in enumerate(file_stages):
            bad = sorted(set(entry) - stage_fields)
            if bad:
                raise InputError(f"stages[{i}]: unknown keys {bad}; known: {sorted(stage_fields)}")
            stages.append(StageConfig(**entry))
    elif config.data is None and config.init is None:
        stages = demo_stages(config.arch)
    else:
        stages = [StageConfig()]
    overrides = {k: v for k, v in args.items() if k in stage_fields and v is not None
                 and k not in ("name", "stage")}
    if isinstance(overrides.get("trained"), str):
        overrides["trained"] = tuple(p.strip() for p in overrides["trained"].split(",") if p.strip())
    config.stages = [dataclasses.replace(s, **overrides) for s in stages]
    validate_config(config)
    if saved is not None:
        _check_resume_changes(saved, config)
    return config


# Settings of one process, not of the run: never taken from the saved configuration.
_NOT_INHERITED = {"stages", "resume", "allow_config_change", "resume_changes", "stop_at_step"}
# Settings that never change what a run computes: free to differ on --resume.
_RUN_LOCAL = {"out", "resume", "allow_config_change", "resume_changes", "save_every", "log_every",
              "eval_n", "eval_batch", "max_new_tokens", "stop_at_step"}


def _saved_config_path(args: dict[str, Any]) -> Path | None:
    if not args.get("resume") or not args.get("out"):
        return None
    path = Path(args["out"]) / "config.json"
    return path if path.is_file() else None


def _saved_run_config(args: dict[str, Any]) -> dict[str, Any] | None:
    """The configuration the run in --out was started with (config.json), for --resume."""
    path = _saved_config_path(args)
    if path is None:
        return None
    try:
        saved = json.loads(path.read_text())["train"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise InputError(f"--resume: {path} is not a run configuration ({err})") from None
    return saved


def _check_resume_changes(saved: dict[str, Any], config: TrainConfig) -> None:
    """Refuse settings that differ from the run's own (exact continuation) unless
    --allow-config-change; then record the changes in config.resume_changes."""
    now = json.loads(json.dumps(config.to_dict()))   # tuples as the saved JSON's lists
    # a setting an older trainer did not have ran at its default
    defaults = json.loads(json.dumps(TrainConfig().to_dict()))
    saved = {**{k: v for k, v in defaults.items() if k != "stages"}, **saved}
    changes = [f"{key}: {saved.get(key)!r} -> {now[key]!r}" for key in now
               if key not in _RUN_LOCAL | {"stages"} and saved.get(key) != now[key]]
    before = [(s["name"], s["stage"]) for s in saved["stages"]]
    after = [(s.name, s.stage) for s in config.stages]
    if before != after:
        changes.append(f"stages differ: the run's {before}, now {after}")
    else:
        changes += [f"stages[{i}].{key}: {old[key]!r} -> {new[key]!r}"
                    for i, (old, new) in enumerate(zip(saved["stages"], now["stages"]))
                    for key in new if old.get(key) != new[key]]
    if changes and not config.allow_config_change:
        raise InputError(f"--resume: these settings differ from the run's own ({'; '.join(changes)}"
                         "); drop those flags to continue the run exactly, or pass "
                         "--allow-config-change to continue with the new ones")
    config.resume_changes = changes


def validate_config(config: TrainConfig) -> None:
    """Every run setting in its range and every path where it must be, before anything is built
    or trained; InputError naming the flag."""
    for f in dataclasses.fields(TrainConfig):
        if f.name != "stages":
            _check_type(f"--{f.name.replace('_', '-')}", getattr(config, f.name), f.type)
    if config.arch not in ("D", "X", "H"):
        raise InputError(f"--arch: expected D, X or H, got {config.arch!r}")
    if config.preset not in PRESETS:
        raise InputError(f"--preset: expected one of {sorted(PRESETS)}, got {config.preset!r}")
    if config.device not in ("auto", "cpu", "cuda"):
        raise InputError(f"--device: expected auto, cpu or cuda, got {config.device!r}")
    if config.device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available here (use cpu or auto)")
    for name, low in (("micro_batch", 1), ("save_every", 1), ("log_every", 1), ("eval_n", 0),
                      ("eval_batch", 1), ("max_new_tokens", 1), ("synth_train", 1)):
        if getattr(config, name) < low:
            raise InputError(f"--{name.replace('_', '-')}: expected >= {low}, "
                             f"got {getattr(config, name)}")
    if config.stop_at_step is not None and config.stop_at_step < 1:
        raise InputError(f"--stop-at-step: expected >= 1, got {config.stop_at_step}")
    if config.init is not None and not (Path(config.init) / "config.json").is_file():
        raise InputError(f"--init: {config.init!r} is not a checkpoint directory (no config.json)")
    if config.no_tile_tags and (config.init is not None or config.arch != "D"):
        raise InputError("--no-tile-tags: for a new NVLM-D model only (a checkpoint's config "
                         "decides its own tags; NVLM-X/H tie each tag to its tile)")
    if config.out is not None and Path(config.out).exists() and not Path(config.out).is_dir():
        raise InputError(f"--out: {config.out!r} exists and is not a directory")
    if config.image_root is not None and not Path(config.image_root).is_dir():
        raise InputError(f"--image-root: {config.image_root!r} is not a directory")
    if config.eval_data is not None:
        check_input_file(config.eval_data, "--eval-data")
    for spec in {config.data, *(s.data for s in config.stages)} - {None}:
        parse_data_spec(spec)   # every file of every stage exists, weights are valid
    for s in config.stages:
        if not isinstance(s.name, str) or not s.name:
            raise InputError(f"stages: every stage needs a name, got {s.name!r}")
        if s.stage not in recipes.STAGES:
            raise InputError(f"stage {s.name!r}: expected one of {recipes.STAGES}, got {s.stage!r}")
        try:
            s.resolve(config.arch, config.preset)        # fail now, not hours into the run
        except (TypeError, ValueError) as err:   # TypeError: a config file's wrong type
            key, _, why = str(err).partition(": ")
            flag = f"--{key.replace('_', '-')}" if key in _STAGE_FIELDS else key
            raise InputError(f"{flag} (stage {s.name!r}): {why or err}") from None
    names = [s.name for s in config.stages]
    if len(set(names)) != len(names):
        raise InputError(f"stages: every stage needs its own name (metrics and checkpoints go by "
                         f"it), got {names}")


_STAGE_FIELDS = {f.name for f in dataclasses.fields(StageConfig)}
_SIMPLE_TYPES = {"int": int, "float": (int, float), "str": str, "bool": bool}


def _check_type(flag: str, value: Any, annotation: str) -> None:
    """A config file's value against the field's annotation ("int", "str | None", ...)."""
    options = [part.strip() for part in str(annotation).split("|")]
    if value is None and "None" in options:
        return
    for option in options:
        expected = _SIMPLE_TYPES.get(option)
        if expected is None:
            return   # a type this check does not cover
        if isinstance(value, expected) and not (isinstance(value, bool) and option != "bool"):
            if isinstance(value, float) and not math.isfinite(value):
                raise InputError(f"{flag}: expected a finite number, got {value}")
            return
    raise InputError(f"{flag}: expected {annotation}, got {value!r}")


def _read_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InputError(f"--config: {str(path)!r} is not a file")
    if path.suffix == ".toml":
        import tomllib

        with open(path, "rb") as f:
            try:
                return tomllib.load(f)
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
                raise InputError(f"--config {path}: not valid TOML ({err})") from None
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise InputError(f"--config {path}: YAML needs PyYAML (pip install pyyaml), "
                             "or write the file as TOML") from None
        with open(path) as f:
            try:
                return yaml.safe_load(f) or {}
            except (yaml.YAMLError, UnicodeDecodeError) as err:
                raise InputError(f"--config {path}: not valid YAML ({err})") from None
    raise InputError(f"--config: expected a .toml or .yaml file, got {str(path)!r}")


# ---------------------------------------------------------------------------------------------
# Optimization

# ---------------------------------------------------------------------------------------------
# Checkpoints of a run

def _checkpoint_dir(out: Path) -> Path:
    return out / "checkpoints"


def latest_checkpoint(out: Path) -> Path | None:
    pointer = _checkpoint_dir(out) / "latest"
    if not pointer.is_file():
        return None
    path = _checkpoint_dir(out) / pointer.read_text().strip()
    return path if (path / "state.pt").is_file() else None


def resumable_checkpoints(out: Path) -> list[Path]:
    """The kept checkpoints, newest first (the `latest` pointer's first, then by step)."""
    folders = sorted((p for p in _checkpoint_dir(out).glob("step-*") if p.is_dir()), reverse=True)
    latest = latest_checkpoint(out)
    if latest is not None:
        folders = [latest] + [p for p in folders if p != latest]
    return folders


def read_newest_checkpoint(out: Path, config: TrainConfig, model_config: NVLMConfig
                           ) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that reads back; an unreadable one (a disk fault, a truncated copy)
    is passed over for the one before it, with a warning. A readable checkpoint of another run is
    an error, not something to skip."""
    for path in resumable_checkpoints(out):
        try:
            state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001  (torch.load's errors on bad bytes vary widely)
            log.warning("checkpoint %s is unreadable (%s: %s); trying the one before it",
                        path, type(err).__name__, str(err).splitlines()[0][:200] if str(err) else "")
            continue
        return path, check_checkpoint(path, state, config, model_config)
    return None


def save_checkpoint(out: Path, world: World, model, optimizer, stage: Stage,
                    position: dict[str, int], config: TrainConfig,
                    model_config: NVLMConfig) -> None:
    """Everything a resumed run needs, written atomically (temp folder, then rename): the model
    and its optimizer, and the stage's own state (its data position; the vision warm-up's heads
    and their optimizer)."""
    model_state = full_model_state(model)
    optimizer_state = full_optimizer_state(model, optimizer)
    if not world.is_main:
        world.barrier()
        return
    state = {
        "position": position,
        "model": model_state,
        "optimizer": optimizer_state,
        "stage": stage.state_dict(),
        "rng": {"torch": torch.get_rng_state()},
        "train_config": config.to_dict(),
        "model_config": model_config.to_dict(),
    }
    folder = _checkpoint_dir(out)
    name = f"step-{position['global_step']:07d}"
    with atomic_directory(folder / name) as tmp:
        torch.save(state, tmp / "state.pt")
    write_text_atomic(folder / "latest", name)
    # Past this step: the abandoned future of a run resumed from an older checkpoint (its newest
    # did not read back); before it: all but the newest few.
    kept = sorted(p for p in folder.glob("step-*") if p.is_dir() and p.name <= name)
    stale = [p for p in folder.glob("step-*") if p.is_dir() and p.name > name]
    for old in kept[:-CHECKPOINTS_KEPT] + stale:
        shutil.rmtree(old, ignore_errors=True)
    world.barrier()


def check_checkpoint(path: Path, state: dict[str, Any], config: TrainConfig,
                     model_config: NVLMConfig) -> dict[str, Any]:
    """Refuse a checkpoint from another model or stage plan, saying what differs."""
    problems = []
    saved = NVLMConfig.from_dict(state["model_config"]).to_dict()   # older files: defaults
    if saved != model_config.to_dict():
        diffs = [k for k in saved if saved[k] != model_config.to_dict().get(k)]
        problems.append(f"model config differs in {diffs}")
    saved_stages = [(s["name"], s["stage"]) for s in state["train_config"]["stages"]]
    stages = [(s.name, s.stage) for s in config.stages]
    if saved_stages != stages:
        problems.append(f"stages differ: checkpoint {saved_stages}, this run {stages}")
    if problems:
        raise InputError(f"--resume: {path} belongs to another run ({'; '.join(problems)}); "
                         "start a new --out or run with the same configuration")
    if "stage" not in state:   # written before the stage objects: data position and heads apart
        heads = state.get("heads")
        state["stage"] = {"data": state["data"],
                          **({"heads": heads["model"], "heads_optimizer": heads["optimizer"]}
                             if heads else {})}
    return state


# ---------------------------------------------------------------------------------------------
# Output: progress, metrics, plot, summary

class Progress:
    """One status line on rank 0: redrawn in place on a terminal, a log line every log_every
    steps otherwise."""

    def __init__(self, world: World, total_steps: int, log_every: int) -> None:
        self.enabled, self.total, self.log_every = world.is_main, total_steps, log_every
        self.tty = sys.stderr.isatty()
        self.start = time.perf_counter()
        self.first_step: int | None = None

    def update(self, step: int, stage: str, loss: float, tokens_per_s: float) -> None:
        """After global step `step` (1-based); the ETA extrapolates this process's pace so far."""
        if not self.enabled:
            return
        if self.first_step is None:
            self.first_step = step - 1       # a resumed run starts past 0
        elapsed = time.perf_counter() - self.start
        eta = elapsed / max(step - self.first_step, 1) * (self.total - step)
        bar = "#" * int(20 * step / max(self.total, 1))
        line = (f"[{bar:<20}] {step}/{self.total} {stage} | loss {loss:.4f} | "
                f"{tokens_per_s:,.0f} tok/s | ETA {_clock(eta)}")
        if self.tty:
            print("\r" + line, end="", file=sys.stderr, flush=True)
        elif step % self.log_every == 0 or step == self.total:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty:
            print(file=sys.stderr)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}:{seconds % 60:02d}"


class MetricsLog:
    """metrics.jsonl, one line per optimizer step; on resume, lines after the checkpoint (written
    by the killed run) are dropped so the file reads like one uninterrupted run."""

    def __init__(self, path: Path, keep_until_step: int | None) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []
        if keep_until_step is not None and path.is_file():
            with open(path) as f:
                rows = [_json_line(line) for line in f]
            # a line cut by the kill that ended the run (the last one) is dropped
            self.rows = [r for r in rows if r is not None and r["step"] <= keep_until_step]
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in self.rows))

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def _json_line(line: str) -> dict[str, Any] | None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) and "step" in row else None


class RunDiverged(RuntimeError):
    """A step's loss or gradient norm is not finite: the run stops before saving it."""


# ---------------------------------------------------------------------------------------------
# The run

def build_model(config: TrainConfig, device: torch.device) -> tuple[NVLM, Any]:
    if config.init:
        model = NVLM.from_pretrained(config.init)
        tokenizer = load_tokenizer(config.init)
    else:
        model_config = NVLMConfig.from_preset(config.preset, arch=config.arch)
        model_config.tile_tags = not config.no_tile_tags
        model_config.validate()
        torch.manual_seed(config.seed)
        model = NVLM(model_config)
        model.init_weights()
        tokenizer = load_tokenizer()
    return model.to(device=device, dtype=torch.float32), tokenizer


def resolve_out_dir(config: TrainConfig, world: World) -> Path:
    if config.out is None:
        if config.resume:
            raise InputError("--resume: say which run to continue with --out")
        stamp = world.broadcast_object(time.strftime("%Y%m%d-%H%M%S"))
        config.out = f"runs/{config.arch}-{config.preset}-{stamp}"
    out = Path(config.out)
    if not config.resume and resumable_checkpoints(out):
        raise InputError(f"--out {out}: holds checkpoints of an earlier run; pass --resume to "
                         "continue it or choose another --out (nothing is overwritten)")
    return out


def prepare_data(config: TrainConfig, out: Path, world: World) -> None:
    """Default data: the synthetic task, generated once into the run folder (rank 0)."""
    if config.data is not None:
        if config.eval_data is None:
            log.warning("no --eval-data: the final exact-match eval is skipped")
        return
    from nvlm.demo import synth

    data_dir = out / "data"
    if world.is_main:
        paths = synth.ensure_task(data_dir, train_n=config.synth_train,
                                  eval_n=max(config.eval_n, 1), seed=config.seed)
    world.barrier()
    paths = synth.task_paths(data_dir)
    config.data = f"{paths['train']}:0.9,{paths['text']}:0.1"
    config.eval_data = str(paths["eval"])
    for stage in config.stages:   # the text warm-up reads the task's recall documents
        if stage.stage == "text" and stage.data is None:
            stage.data = str(paths["recall"])


def train(config: TrainConfig) -> dict[str, Any]:
    wall_start = time.perf_counter()
    world = init_world(config.device)
    logging.basicConfig(level=logging.INFO if world.is_main else logging.WARNING,
                        format="%(message)s")
    out = resolve_out_dir(config, world)
    lock = None
    if world.is_main:   # rank 0 holds the folder for the whole job
        out.mkdir(parents=True, exist_ok=True)
        lock = RunLock(out).acquire()
        if lock.stale:
            log.warning("--out %s: taking over the lock of a run that ended without releasing "
                        "it (%s)", out, lock.stale)
        for folder in (out, _checkpoint_dir(out)):
            removed = remove_temporaries(folder)
            if removed:
                log.info("removed %d temporaries a killed run left in %s", len(removed), folder)
    try:
        world.barrier()
        return _train(config, world, out, wall_start)
    finally:
        if lock is not None:
            lock.release()


def _train(config: TrainConfig, world: World, out: Path, wall_start: float) -> dict[str, Any]:
    prepare_data(config, out, world)
    model, tokenizer = build_model(config, world.device)
    model_config = model.config
    processor = NVLMProcessor(tokenizer, model_config)
    found = read_newest_checkpoint(out, config, model_config) if config.resume else None
    if config.resume and found is None:
        unreadable = len(resumable_checkpoints(out))
        raise InputError(f"--resume: {out} has no checkpoint to continue from"
                         + (f" ({unreadable} that do not read back)" if unreadable else ""))
    resume_path, resumed = found if found else (None, None)
    if config.resume_changes:
        log.warning("--resume with --allow-config-change: %s", "; ".join(config.resume_changes))
    stage_recipes = [s.resolve(config.arch, config.preset) for s in config.stages]
    for stage, recipe in zip(config.stages, stage_recipes):   # before any stage trains
        STAGE_KINDS[stage.stage].check_fits(stage.name, recipe, world, config.micro_batch)
    if world.is_main:
        write_text_atomic(out / "config.json", json.dumps(
            {"train": config.to_dict(), "model": model_config.to_dict()}, indent=2))
    if world.distributed:
        shard_model(model)
    if resumed is not None:
        load_full_state(model, None, resumed["model"], None)
        log.info("resumed from %s at global step %d", resume_path,
                 resumed["position"]["global_step"])

    total_steps = sum(r.steps for r in stage_recipes)
    metrics = MetricsLog(out / "metrics.jsonl",
                         resumed["position"]["global_step"] if resumed else None) \
        if world.is_main else None
    progress = Progress(world, total_steps, config.log_every)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if world.device.type == "cuda"
                else torch.autocast("cpu", enabled=False))

    global_step = 0
    train_tokens, train_seconds = 0, 0.0
    for stage_index, (stage_config, recipe) in enumerate(zip(config.stages, stage_recipes)):
        stage_start_global = global_step
        global_step += recipe.steps
        if resumed and stage_index < resumed["position"]["stage"]:
            continue
        recipes.apply_freeze(model, recipe.trained)
        optimizer = build_optimizer(model, recipe)
        context = StageContext(
            model=model, processor=processor, specs=parse_data_spec(stage_config.data or config.data),
            seed=config.seed + 1000 * stage_index,
            image_root=Path(config.image_root) if config.image_root else None,
            world=world, micro_batch=config.micro_batch, autocast=autocast)
        stage = STAGE_KINDS[stage_config.stage](stage_config.name, recipe, context)
        step = 0
        if resumed and stage_index == resumed["position"]["stage"]:
            step = resumed["position"]["stage_step"]
            load_full_state(model, optimizer, resumed["model"], resumed["optimizer"])
            stage.load_state_dict(resumed["stage"])
            torch.set_rng_state(resumed["rng"]["torch"])
        optimizers = [optimizer, *stage.optimizers]
        trainable = [p for p in model.parameters() if p.requires_grad]
        clipped = trainable + stage.parameters
        log.info("stage %d/%d %s: training %s (%s parameters), %d steps of %d %s",
                 stage_index + 1, len(config.stages), stage.name, ",".join(recipe.trained),
                 f"{sum(p.numel() for p in trainable):,}", recipe.steps, recipe.global_batch,
                 stage.batch_unit)

        while step < recipe.steps:
            t0 = time.perf_counter()
            for opt in optimizers:
                for group in opt.param_groups:
                    group["lr"] = lr_at(step, recipe)
            result = stage.step()
            grad_norm = float(_full_value(torch.nn.utils.clip_grad_norm_(clipped,
                                                                         recipe.grad_clip)))
            if not (math.isfinite(result.loss) and math.isfinite(grad_norm)):
                last = latest_checkpoint(out)
                raise RunDiverged(
                    f"step {stage_start_global + step + 1} (stage {stage.name!r}): loss "
                    f"{result.loss}, gradient norm {grad_norm}: not finite. Stopped before "
                    f"the update; {'the last good state is ' + str(last) if last else 'nothing was saved'}"
                    ". Lower --lr or --grad-clip, or check the data, then --resume or start over")
            for opt in optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)
            step += 1
            seconds = time.perf_counter() - t0
            train_tokens += result.tokens
            train_seconds += seconds
            g = stage_start_global + step
            if metrics is not None:
                metrics.append({"step": g, "stage": stage.name, "loss": result.loss,
                                "lr": optimizer.param_groups[0]["lr"], "grad_norm": grad_norm,
                                "tokens": result.tokens,
                                "tokens_per_s": result.tokens / seconds,
                                "skipped": stage.skips.total(), **result.metrics})
            progress.update(g, stage.name, result.loss, result.tokens / seconds)
            if step == recipe.steps or step % config.save_every == 0 or g == config.stop_at_step:
                position = {"stage": stage_index, "stage_step": step, "global_step": g}
                save_checkpoint(out, world, model, optimizer, stage, position, config,
                                model_config)
            if g == config.stop_at_step:
                progress.close()
                log.info("stopped at step %d (--stop-at-step); resume with --resume", g)
                return {"stopped_at_step": g}
        if stage.skips.total() and world.is_main:
            log.warning("stage %s skipped %d samples: %s", stage.name, stage.skips.total(),
                        dict(stage.skips.counts))
    progress.close()

    # The final model, evaluated on rank 0 as a plain module.
    model_state = full_model_state(model)
    summary: dict[str, Any] = {}
    if world.is_main:
        final = NVLM(model_config)
        final.load_state_dict(model_state)
        final.to(world.device).eval()
        final.save_pretrained(out / "model")
        summary = summarize(config, metrics.rows, final, processor, stage_recipes[-1],
                            world.device)
        summary["tokens_per_s"] = train_tokens / max(train_seconds, 1e-9)
        summary["wall_s"] = time.perf_counter() - wall_start
        write_text_atomic(out / "summary.json", json.dumps(summary, indent=2))
        from nvlm.plot import plot_loss

        plot_loss(metrics.rows, out / "loss.png")
        print(json.dumps(summary, indent=2))
    world.barrier()
    return summary


def summarize(config: TrainConfig, rows: list[dict[str, Any]], model: NVLM,
              processor: NVLMProcessor, recipe: recipes.StageRecipe,
              device: torch.device) -> dict[str, Any]:
    from nvlm.evaluate import exact_match

    # The language model's loss on the run's data: the stages whose loss is that (the warm-ups'
    # losses are on their own tasks: in stage_losses, and what else they report in theirs).
    kinds = {s.name: STAGE_KINDS[s.stage] for s in config.stages}
    lm_stages = {name for name, kind in kinds.items() if kind.reports_lm_loss}
    losses = [r["loss"] for r in rows if r["stage"] in lm_stages]
    summary: dict[str, Any] = {
        "steps": len(rows),
        "train_loss_first": losses[0] if losses else None,
        # The mean of the last 10 steps: one step's loss on a small batch is noisy.
        "train_loss_final": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
        "eval_n": 0, "eval_exact_match": None, "eval_exact_match_blank": None,
        "padding_fraction": 0.0,
    }
    # Per stage, in order: its first loss and the mean of its last 10 (the LM stages' losses are
    # not comparable with each other: each has its own data).
    stage_losses: dict[str, list[float]] = {}
    for r in rows:
        stage_losses.setdefault(r["stage"], []).append(r["loss"])
    summary["stage_losses"] = {name: {"first": values[0],
                                      "final": sum(values[-10:]) / len(values[-10:])}
                               for name, values in stage_losses.items()}
    for name, kind in kinds.items():   # what each stage reports of itself, later ones winning
        summary.update(kind.summary([r for r in rows if r["stage"] == name]))
    if config.eval_data:
        items = load_eval_set(Path(config.eval_data), config.eval_n,
                              Path(config.image_root) if config.image_root else None)
        kwargs = dict(max_tiles=recipe.max_tiles, batch_size=config.eval_batch,
                      max_new_tokens=config.max_new_tokens, device=device)
        summary["eval_n"] = len(items)
        summary["eval_exact_match"] = exact_match(model, processor, items, **kwargs)
        summary["eval_exact_match_blank"] = exact_match(model, processor, items, blank=True,
                                                        **kwargs)
    return summary


def _full_value(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (FSDP2 returns the grad norm as one), else the tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        config = parse_args(argv)
        train(config)
    except RunDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (InputError, OSError) as err:   # refused input: bad flag, data, checkpoint, folder
        if "--debug" in argv:
            raise
        print(f"error: {err} (--debug shows where)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
