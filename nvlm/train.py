"""The NVLM trainer: the paper's staged recipes on packed multimodal data, from a CPU to many GPUs.

Single process (the default demo: synthetic task, tiny NVLM-D, CPU, about 10 minutes):
    python nvlm/train.py
    python -m nvlm.train                                  # the same
One stage of the paper's recipe on your data, from a public checkpoint:
    python nvlm/train.py --init NVLM-D-72B/ --stage sft --data a.jsonl:0.8,b.jsonl:0.2 --out runs/sft
Several processes (FSDP2, one shard unit per ViT/decoder block; gloo on CPU, nccl on GPU):
    torchrun --nproc_per_node 8 nvlm/train.py --preset 1b --stage sft --data train.jsonl --out runs/1b
A config file (TOML, or YAML when PyYAML is installed) holds the same keys; command-line flags win:
    python nvlm/train.py --config run.toml            # top-level keys + [[stages]] tables
Resume a killed run where its last checkpoint left it (same losses as an uninterrupted run):
    python nvlm/train.py --out runs/sft --resume

A run is a list of stages (NVLM.md section 9: pretrain trains the projector, SFT the projector and
the LLM; the ViT stays frozen). `--stage` picks one recipe from nvlm.recipes; the default demo chains
several (see demo_stages), starting with our `vision` warm-up for a from-scratch ViT (nvlm.warmup,
one process only). Stage flags (--steps, --lr, ...) override every stage of the run.

The run folder (--out) gets: config.json (the resolved run), metrics.jsonl (one line per step),
checkpoints/ (atomic, the latest two kept), model/ (save_pretrained of the final model),
loss.png, and summary.json (steps, first/final train loss, eval exact match with the images and with
blank images, tokens/s, wall seconds).
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
from nvlm.config import NVLMConfig  # noqa: E402
from nvlm.data import RowPacker, SampleStream, load_eval_set, parse_data_spec  # noqa: E402
from nvlm.files import atomic_directory, write_text_atomic  # noqa: E402
from nvlm.distributed import (World, full_model_state, full_optimizer_state, init_world,  # noqa: E402
                              load_full_state, shard_model)
from nvlm.model import IGNORE_INDEX, NVLM, next_token_targets  # noqa: E402
from nvlm.processing import NVLMProcessor, pack_samples  # noqa: E402
from nvlm.tokenizer import load_tokenizer  # noqa: E402
from nvlm.warmup import GlyphStream, TokenOCRHeads, ocr_loss  # noqa: E402

log = logging.getLogger("nvlm.train")

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
    stop_at_step: int | None = None    # end the process after this global step (as if killed)
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig()])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The default demo (python nvlm/train.py with no arguments): NVLM's staged training in miniature,
# sized for about 10 minutes on 2 CPU cores. The tiny model starts from random weights, not from
# a pretrained ViT and LLM as NVLM does, so a vision warm-up (nvlm.warmup: per-token OCR labels)
# comes first and gives the ViT the reading skill InternViT brings; then the paper's stages with
# their freeze sets (ViT frozen): pretrain (the projector, or NVLM-X/H's X-attn), then SFT.
def demo_stages(arch: str) -> list[StageConfig]:
    return [StageConfig(name="vision", stage="vision", steps=450),
            StageConfig(name="pretrain", stage="pretrain", steps=50),
            StageConfig(name="sft", stage="sft", steps=2400, min_lr=5e-4)]


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
    """Defaults < config file < command line; then the stage list."""
    values: dict[str, Any] = {}
    file_stages = None
    if args.get("config"):
        file_values = _read_config_file(Path(args["config"]))
        file_stages = file_values.pop("stages", None)
        values.update(file_values)
    run_fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"stages"}
    values.update({k: v for k, v in args.items() if k in run_fields and v is not None})
    unknown = sorted(set(values) - run_fields)
    if unknown:
        raise ValueError(f"config: unknown keys {unknown}; known: {sorted(run_fields)}")
    config = TrainConfig(**values)

    stage_fields = {f.name for f in dataclasses.fields(StageConfig)}
    if args.get("stage"):
        stages = [StageConfig(name=args["stage"], stage=args["stage"])]
    elif file_stages is not None:
        stages = []
        for i, entry in enumerate(file_stages):
            bad = sorted(set(entry) - stage_fields)
            if bad:
                raise ValueError(f"stages[{i}]: unknown keys {bad}; known: {sorted(stage_fields)}")
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
    for s in config.stages:
        s.resolve(config.arch, config.preset)        # fail now, not hours into the run
    return config


def _read_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"--config: {str(path)!r} is not a file")
    if path.suffix == ".toml":
        import tomllib

        with open(path, "rb") as f:
            return tomllib.load(f)
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"--config {path}: YAML needs PyYAML (pip install pyyaml), "
                             "or write the file as TOML") from None
        with open(path) as f:
            return yaml.safe_load(f) or {}
    raise ValueError(f"--config: expected a .toml or .yaml file, got {str(path)!r}")


# ---------------------------------------------------------------------------------------------
# Optimization

def build_optimizer(model: torch.nn.Module, recipe: recipes.StageRecipe) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only; no weight decay on norms, biases, gates and
    LayerScale (every parameter with fewer than 2 dims)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": recipe.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel per parameter group instead of a dozen per tensor (the tiny model's step:
    # 1.8 instead of 7.6 ms on 2 CPU cores); also on FSDP2's sharded DTensor parameters.
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=recipe.lr, betas=recipe.betas,
                             fused=True)


def lr_at(step: int, recipe: recipes.StageRecipe) -> float:
    """Linear warm-up to lr, then a cosine decay to min_lr at the last step."""
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    span = max(1, recipe.steps - recipe.warmup_steps)
    progress = min(1.0, (step - recipe.warmup_steps) / span)
    return recipe.min_lr + 0.5 * (recipe.lr - recipe.min_lr) * (1 + math.cos(math.pi * progress))


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


def save_checkpoint(out: Path, world: World, model, optimizer, data, position: dict[str, int],
                    config: TrainConfig, model_config: NVLMConfig,
                    heads: dict[str, Any] | None = None) -> None:
    """Everything a resumed run needs, written atomically (temp folder, then rename). `data` is
    the stage's data position (RowPacker or GlyphStream); `heads` the vision warm-up's heads and
    their optimizer."""
    model_state = full_model_state(model)
    optimizer_state = full_optimizer_state(model, optimizer)
    if not world.is_main:
        world.barrier()
        return
    state = {
        "position": position,
        "model": model_state,
        "optimizer": optimizer_state,
        "data": data.state_dict(),
        "heads": heads,
        "rng": {"torch": torch.get_rng_state()},
        "train_config": config.to_dict(),
        "model_config": model_config.to_dict(),
    }
    folder = _checkpoint_dir(out)
    name = f"step-{position['global_step']:07d}"
    with atomic_directory(folder / name) as tmp:
        torch.save(state, tmp / "state.pt")
    write_text_atomic(folder / "latest", name)
    kept = sorted(p for p in folder.glob("step-*") if p.is_dir())
    for old in kept[:-CHECKPOINTS_KEPT]:
        shutil.rmtree(old, ignore_errors=True)
    world.barrier()


def load_checkpoint(path: Path, config: TrainConfig, model_config: NVLMConfig) -> dict[str, Any]:
    """Read a checkpoint and refuse one from another model or stage plan, saying what differs."""
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    problems = []
    if state["model_config"] != model_config.to_dict():
        saved = NVLMConfig.from_dict(state["model_config"]).to_dict()
        diffs = [k for k in saved if saved[k] != model_config.to_dict().get(k)]
        problems.append(f"model config differs in {diffs}")
    saved_stages = [(s["name"], s["stage"]) for s in state["train_config"]["stages"]]
    stages = [(s.name, s.stage) for s in config.stages]
    if saved_stages != stages:
        problems.append(f"stages differ: checkpoint {saved_stages}, this run {stages}")
    if problems:
        raise ValueError(f"--resume: {path} belongs to another run ({'; '.join(problems)}); "
                         "start a new --out or run with the same configuration")
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
                self.rows = [r for r in map(json.loads, f) if r["step"] <= keep_until_step]
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in self.rows))

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


# ---------------------------------------------------------------------------------------------
# The run

def build_model(config: TrainConfig, device: torch.device) -> tuple[NVLM, Any]:
    if config.init:
        model = NVLM.from_pretrained(config.init)
        tokenizer = load_tokenizer(config.init)
    else:
        model_config = NVLMConfig.from_preset(config.preset, arch=config.arch)
        torch.manual_seed(config.seed)
        model = NVLM(model_config)
        model.init_weights()
        tokenizer = load_tokenizer()
    return model.to(device=device, dtype=torch.float32), tokenizer


def resolve_out_dir(config: TrainConfig, world: World) -> Path:
    if config.out is None:
        if config.resume:
            raise ValueError("--resume: say which run to continue with --out")
        stamp = world.broadcast_object(time.strftime("%Y%m%d-%H%M%S"))
        config.out = f"runs/{config.arch}-{config.preset}-{stamp}"
    out = Path(config.out)
    if not config.resume and latest_checkpoint(out) is not None:
        raise ValueError(f"--out {out}: holds checkpoints of an earlier run; pass --resume to "
                         "continue it or choose another --out (nothing is overwritten)")
    return out


def prepare_data(config: TrainConfig, out: Path, world: World) -> None:
    """Default data: the synthetic task, generated once into the run folder (rank 0)."""
    if config.data is not None:
        if config.eval_data is None:
            log.warning("no --eval-data: the final exact-match eval is skipped")
        return
    from nvlm import synth

    data_dir = out / "data"
    if world.is_main:
        paths = synth.ensure_task(data_dir, train_n=config.synth_train,
                                  eval_n=max(config.eval_n, 1), seed=config.seed)
    world.barrier()
    paths = synth.task_paths(data_dir)
    config.data = f"{paths['train']}:0.9,{paths['text']}:0.1"
    config.eval_data = str(paths["eval"])


def train(config: TrainConfig) -> dict[str, Any]:
    wall_start = time.perf_counter()
    world = init_world(config.device)
    logging.basicConfig(level=logging.INFO if world.is_main else logging.WARNING,
                        format="%(message)s")
    out = resolve_out_dir(config, world)
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
    world.barrier()
    prepare_data(config, out, world)

    model, tokenizer = build_model(config, world.device)
    model_config = model.config
    processor = NVLMProcessor(tokenizer, model_config)
    resume_path = latest_checkpoint(out) if config.resume else None
    if config.resume and resume_path is None:
        raise ValueError(f"--resume: {out} has no checkpoint to continue from")
    resumed = load_checkpoint(resume_path, config, model_config) if resume_path else None
    if world.is_main:
        write_text_atomic(out / "config.json", json.dumps(
            {"train": config.to_dict(), "model": model_config.to_dict()}, indent=2))
    if world.distributed:
        shard_model(model)
    if resumed is not None:
        load_full_state(model, None, resumed["model"], None)
        log.info("resumed from %s at global step %d", resume_path,
                 resumed["position"]["global_step"])

    stage_recipes = [s.resolve(config.arch, config.preset) for s in config.stages]
    total_steps = sum(r.steps for r in stage_recipes)
    metrics = MetricsLog(out / "metrics.jsonl",
                         resumed["position"]["global_step"] if resumed else None) \
        if world.is_main else None
    progress = Progress(world, total_steps, config.log_every)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if world.device.type == "cuda"
                else torch.autocast("cpu", enabled=False))

    global_step = 0
    train_tokens, train_seconds = 0, 0.0
    padding = []
    for stage_index, (stage, recipe) in enumerate(zip(config.stages, stage_recipes)):
        stage_start_global = global_step
        global_step += recipe.steps
        if resumed and stage_index < resumed["position"]["stage"]:
            continue
        vision = stage.stage == "vision"
        if vision and world.distributed:
            raise ValueError(f"stage {stage.name!r}: the vision warm-up runs in one process "
                             "(its heads live outside the FSDP-sharded model); run it alone "
                             "first, then --init the sharded run from its model/")
        rows_per_rank, rem = divmod(recipe.global_batch, world.size)
        if not vision and (rem or rows_per_rank % config.micro_batch):
            raise ValueError(f"global_batch {recipe.global_batch}: must split into {world.size} "
                             f"rank(s) x micro_batch {config.micro_batch} x accumulation")
        recipes.apply_freeze(model, recipe.trained)
        optimizer = build_optimizer(model, recipe)
        specs = parse_data_spec(stage.data or config.data)
        image_root = Path(config.image_root) if config.image_root else None
        seed = config.seed + 1000 * stage_index
        if vision:
            stream = GlyphStream(specs, model_config, recipe.max_tiles, seed, image_root)
            heads = TokenOCRHeads(model_config.vision.hidden_size
                                  * model_config.projector.downsample_scale ** 2).to(world.device)
            head_optimizer = build_optimizer(heads, recipe)
            data = stream
        else:
            stream = SampleStream(specs, processor, seed=seed, max_len=recipe.seq_len,
                                  max_tiles=recipe.max_tiles, image_root=image_root)
            heads = head_optimizer = None
            data = RowPacker(stream, recipe.seq_len)
        step = 0
        if resumed and stage_index == resumed["position"]["stage"]:
            step = resumed["position"]["stage_step"]
            load_full_state(model, optimizer, resumed["model"], resumed["optimizer"])
            data.load_state_dict(resumed["data"])
            if heads is not None:
                heads.load_state_dict(resumed["heads"]["model"])
                head_optimizer.load_state_dict(resumed["heads"]["optimizer"])
            torch.set_rng_state(resumed["rng"]["torch"])
        trainable = [p for p in model.parameters() if p.requires_grad]
        clipped = trainable + (list(heads.parameters()) if heads is not None else [])
        log.info("stage %d/%d %s: training %s (%s parameters), %d steps of %d %s",
                 stage_index + 1, len(config.stages), stage.name, ",".join(recipe.trained),
                 f"{sum(p.numel() for p in trainable):,}", recipe.steps, recipe.global_batch,
                 "tiles" if vision else f"rows x {recipe.seq_len} tokens")

        while step < recipe.steps:
            t0 = time.perf_counter()
            for opt in (optimizer, head_optimizer):
                for group in (opt.param_groups if opt is not None else ()):
                    group["lr"] = lr_at(step, recipe)
            if vision:
                loss, tokens, extra = _vision_step(model, heads, stream, recipe, world)
            else:
                loss, tokens, extra = _lm_step(model, data, recipe, config, world, autocast)
            grad_norm = torch.nn.utils.clip_grad_norm_(clipped, recipe.grad_clip)
            for opt in (optimizer, head_optimizer):
                if opt is not None:
                    opt.step()
                    opt.zero_grad(set_to_none=True)
            step += 1
            seconds = time.perf_counter() - t0
            train_tokens += int(tokens)
            train_seconds += seconds
            if not vision:
                padding.append(data.padding_fraction)
            g = stage_start_global + step
            if metrics is not None:
                metrics.append({"step": g, "stage": stage.name, "loss": loss,
                                "lr": optimizer.param_groups[0]["lr"],
                                "grad_norm": float(_full_value(grad_norm)), "tokens": int(tokens),
                                "tokens_per_s": tokens / seconds,
                                "skipped": stream.skips.total(), **extra})
            progress.update(g, stage.name, loss, tokens / seconds)
            last_step = step == recipe.steps
            if last_step or step % config.save_every == 0 or g == config.stop_at_step:
                position = {"stage": stage_index, "stage_step": step, "global_step": g}
                heads_state = ({"model": heads.state_dict(),
                                "optimizer": head_optimizer.state_dict()}
                               if heads is not None else None)
                save_checkpoint(out, world, model, optimizer, data, position, config,
                                model_config, heads_state)
            if g == config.stop_at_step:
                progress.close()
                log.info("stopped at step %d (--stop-at-step); resume with --resume", g)
                return {"stopped_at_step": g}
        if stream.skips.total() and world.is_main:
            log.warning("stage %s skipped %d samples: %s", stage.name, stream.skips.total(),
                        dict(stream.skips.counts))
    progress.close()

    # The final model, evaluated on rank 0 as a plain module.
    model_state = full_model_state(model)
    summary: dict[str, Any] = {}
    if world.is_main:
        final = NVLM(model_config)
        final.load_state_dict(model_state)
        final.to(world.device).eval()
        final.save_pretrained(out / "model")
        summary = summarize(config, out, metrics.rows, final, processor, stage_recipes[-1],
                            world.device)
        summary["tokens_per_s"] = train_tokens / max(train_seconds, 1e-9)
        summary["padding_fraction"] = padding[-1] if padding else 0.0
        summary["wall_s"] = time.perf_counter() - wall_start
        write_text_atomic(out / "summary.json", json.dumps(summary, indent=2))
        from nvlm.plot import plot_loss

        plot_loss(metrics.rows, out / "loss.png")
        print(json.dumps(summary, indent=2))
    world.barrier()
    return summary


def _lm_step(model, packer: RowPacker, recipe: recipes.StageRecipe, config: TrainConfig,
             world: World, autocast) -> tuple[float, int, dict[str, float]]:
    """Forward and backward of one optimizer step's packed rows (pretrain, SFT): the step's
    mean loss over all its targets on all ranks, its tokens, and the row padding so far."""
    rows = [packer.next_row() for _ in range(recipe.global_batch)]
    mine = rows[world.rank::world.size]
    batches = [pack_samples([s for row in mine[i:i + config.micro_batch] for s in row])
               for i in range(0, len(mine), config.micro_batch)]
    counts = [int((next_token_targets(b.labels, b.cu_seqlens) != IGNORE_INDEX).sum())
              for b in batches]
    total_count, tokens = world.sum([sum(counts), sum(len(b) for b in batches)])
    loss_sum = 0.0
    for batch in batches:
        batch = batch.to(world.device)
        with autocast:
            output = model(batch.input_ids, batch.pixel_values, batch.labels,
                           cu_seqlens=batch.cu_seqlens, position_ids=batch.position_ids,
                           max_seqlen=batch.max_seqlen, xattn=batch.xattn, return_logits=False)
        # The step's loss is the mean over all its targets on all ranks; FSDP averages
        # gradients over ranks, hence the world size.
        weight = output.num_label_tokens * world.size / max(total_count, 1)
        (output.loss * weight).backward()
        loss_sum += float(output.loss.detach()) * output.num_label_tokens
    (loss_total,) = world.sum([loss_sum])
    return loss_total / max(total_count, 1), int(tokens), {"padding": packer.padding_fraction}


def _vision_step(model: NVLM, heads: TokenOCRHeads, stream: GlyphStream,
                 recipe: recipes.StageRecipe, world: World) -> tuple[float, int, dict[str, float]]:
    """Forward and backward of one vision warm-up step (global_batch tiles, one process)."""
    batch = stream.next_batch(recipe.global_batch).to(world.device)
    loss, stats = ocr_loss(model.vision_model, heads, batch,
                           model.config.projector.downsample_scale)
    loss.backward()
    return float(loss.detach()), batch.pixel_values.shape[0] * model.config.tokens_per_tile, stats


def summarize(config: TrainConfig, out: Path, rows: list[dict[str, Any]], model: NVLM,
              processor: NVLMProcessor, recipe: recipes.StageRecipe,
              device: torch.device) -> dict[str, Any]:
    from nvlm.evaluate import exact_match

    # The language-model loss: the vision warm-up's rows (OCR loss) are reported apart.
    losses = [r["loss"] for r in rows if "glyph_tokens" not in r]
    warmup = [r["glyph_accuracy"] for r in rows
              if "glyph_tokens" in r and r["glyph_accuracy"] is not None]
    summary: dict[str, Any] = {
        "steps": len(rows),
        "train_loss_first": losses[0] if losses else None,
        # The mean of the last 10 steps: one step's loss on a small batch is noisy.
        "train_loss_final": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
        "eval_n": 0, "eval_exact_match": None, "eval_exact_match_blank": None,
    }
    if warmup:
        # Share of glyph tokens whose ordinal and character both came out right, last 10 steps.
        summary["vision_glyph_accuracy"] = sum(warmup[-10:]) / len(warmup[-10:])
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
    try:
        config = parse_args(argv)
        train(config)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
