"""Training recipes: what each stage trains and with which hyper-parameters (docs/nvlm.md section 9).

`paper_recipe(arch, stage)` is the paper's Table 10-11 row as a StageRecipe; `recipe(arch, stage,
preset)` scales it to a model size (the paper's numbers are for 34B/72B models on 128 GPUs; tiny
models trained from scratch on a CPU want larger learning rates, far fewer steps and smaller
batches). Everything here can be overridden from the trainer's command line or config file.

Parts a stage can train: "vision" (InternViT), "projector" (mlp1), "llm" (the decoder and its
embeddings), "xattn" (NVLM-X/H cross-attention blocks). The ViT is frozen in every NVLM stage.

Two stages are ours, not the paper's; they stand in for the pretraining NVLM's parts come with,
for models trained from scratch (the demo):
- "vision", the warm-up of a from-scratch ViT on per-token OCR labels (nvlm.demo.warmup), for
  InternViT's. In it `global_batch` counts tiles, not packed rows, and `seq_len` is unused.
- "text", the warm-up of a from-scratch decoder on text alone (the demo's data: find a code in a
  document and copy it, nvlm.demo.synth.write_recall_split), for the LLM's. An ordinary LM stage that
  trains the LLM on its data.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from .config import check_max_tiles
from .errors import InputError

PARTS = ("vision", "projector", "llm", "xattn")
STAGES = ("vision", "text", "pretrain", "sft")


@dataclass
class StageRecipe:
    trained: tuple[str, ...]          # parts that get gradients and optimizer state
    global_batch: int                 # packed rows per optimizer step, all ranks together
    lr: float                         # peak learning rate
    min_lr: float                     # floor of the cosine decay
    warmup_steps: int
    betas: tuple[float, float]
    weight_decay: float
    grad_clip: float
    seq_len: int                      # tokens per packed row
    max_tiles: int                    # regular tiles per image (1: no tiling, no thumbnail)
    steps: int

    def validate(self) -> "StageRecipe":
        """Every field in its range (a NaN or negative clip, a zero batch or an infinite learning
        rate would train garbage without an error); InputError naming the field otherwise."""
        unknown = sorted(set(self.trained) - set(PARTS))
        if unknown or not self.trained:
            raise InputError(f"trained: expected a non-empty subset of {PARTS}, got {self.trained}")
        for name in ("global_batch", "seq_len", "max_tiles", "steps", "warmup_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise InputError(f"{name}: expected an integer, got {value!r}")
            if value < (0 if name == "warmup_steps" else 1):
                raise InputError(f"{name}: expected >= {0 if name == 'warmup_steps' else 1}, "
                                 f"got {value}")
        check_max_tiles(self.max_tiles)   # a bound: every tile grid is enumerated
        for name in ("lr", "min_lr", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) \
                    or not math.isfinite(value):
                raise InputError(f"{name}: expected a finite number, got {value!r}")
        if self.lr <= 0:
            raise InputError(f"lr: expected > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise InputError(f"min_lr: expected 0 <= min_lr <= lr = {self.lr}, got {self.min_lr}")
        if self.weight_decay < 0:
            raise InputError(f"weight_decay: expected >= 0, got {self.weight_decay}")
        # clip_grad_norm_ with a bound of 0 zeroes every gradient; negative flips them
        if self.grad_clip <= 0:
            raise InputError(f"grad_clip: expected > 0, got {self.grad_clip}")
        if (len(self.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1
                                            for b in self.betas)):
            raise InputError(f"betas: expected two numbers in [0, 1), got {self.betas!r}")
        return self


# docs/nvlm.md section 9, per (arch, stage).
_PAPER = {
    ("D", "pretrain"): StageRecipe(("projector",), 2048, 1e-4, 2.5e-5, 500, (0.9, 0.95), 0.1, 10.0, 512, 1, 20_000),
    ("X", "pretrain"): StageRecipe(("xattn",), 2048, 1e-4, 1e-5, 1000, (0.9, 0.95), 0.05, 1.0, 512, 1, 20_000),
    ("H", "pretrain"): StageRecipe(("xattn", "projector"), 2048, 1e-4, 1e-5, 1000, (0.9, 0.98), 0.05, 1.0, 512, 6, 20_000),
    ("D", "sft"): StageRecipe(("projector", "llm"), 128, 2e-6, 2.5e-7, 1000, (0.9, 0.98), 0.1, 10.0, 3200, 6, 40_000),
    ("X", "sft"): StageRecipe(("xattn", "llm"), 256, 1e-5, 1e-7, 500, (0.9, 0.98), 0.05, 1.0, 1024, 6, 20_000),
    ("H", "sft"): StageRecipe(("xattn", "projector", "llm"), 256, 1e-5, 1e-7, 1000, (0.9, 0.98), 0.05, 1.0, 1280, 6, 40_000),
}


def paper_recipe(arch: str, stage: str) -> StageRecipe:
    if (arch, stage) not in _PAPER:
        raise InputError("arch/stage: expected arch in D/X/H and a paper stage (pretrain or "
                         f"sft), got {arch!r}/{stage!r}")
    return _PAPER[(arch, stage)]


# The vision warm-up (not in the paper; module docstring). Sized for the tiny demo: after 450
# steps the tiny ViT gets position and character right on 87-88% of the synthetic task's glyph
# tokens (measured in the demo), enough for the decoder to read the codes (docs/results.md).
VISION_WARMUP = StageRecipe(("vision",), global_batch=32, lr=2e-3, min_lr=2e-4, warmup_steps=30,
                            betas=(0.9, 0.98), weight_decay=0.0, grad_clip=1.0, seq_len=1,
                            max_tiles=6, steps=450)


# The text warm-up (not in the paper; module docstring), sized for the tiny demo: 800 steps of one
# packed row (7-20 documents) take the recall task's loss from 2.7 to about 0.04.
TEXT_WARMUP = StageRecipe(("llm",), global_batch=1, lr=1e-3, min_lr=1e-4, warmup_steps=20,
                          betas=(0.9, 0.98), weight_decay=0.1, grad_clip=10.0, seq_len=1024,
                          max_tiles=1, steps=800)


def recipe(arch: str, stage: str, preset: str) -> StageRecipe:
    """The paper's recipe for the big presets; scaled for `tiny` (a CPU model trained from
    scratch): 10-100x larger learning rates, short warm-up, one packed row (about 4 samples) per
    step, many steps -- small steps found the image tokens that hold the answer sooner than
    fewer large ones (docs/results.md). The freeze sets and optimizer settings stay the paper's.
    The warm-ups `vision` and `text` have their own recipes, for every preset."""
    if stage in ("vision", "text"):
        if arch not in ("D", "X", "H"):
            raise InputError(f"arch: expected D, X or H, got {arch!r}")
        return VISION_WARMUP if stage == "vision" else TEXT_WARMUP
    base = paper_recipe(arch, stage)
    if preset != "tiny":
        return base
    lr = {"pretrain": 2e-3, "sft": 1e-3}[stage]
    return dataclasses.replace(base, global_batch=1, lr=lr, min_lr=lr / 10, warmup_steps=20,
                               seq_len=1024, steps=200)


def trainable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The model's parts by recipe name (absent parts, e.g. xattn in NVLM-D, are left out)."""
    parts = {"vision": getattr(model, "vision_model", None), "projector": getattr(model, "mlp1", None),
             "llm": getattr(model, "language_model", None), "xattn": getattr(model, "xattn", None)}
    return {name: module for name, module in parts.items() if module is not None}


def apply_freeze(model: nn.Module, trained: tuple[str, ...]) -> list[str]:
    """requires_grad on exactly the trained parts; returns the trainable parameter names."""
    parts = trainable_modules(model)
    missing = sorted(set(trained) - set(parts))
    if missing:
        raise InputError(f"trained: parts {missing} do not exist in this model "
                         f"(it has {sorted(parts)})")
    model.requires_grad_(False)
    for name in trained:
        parts[name].requires_grad_(True)
    return [name for name, p in model.named_parameters() if p.requires_grad]


def build_optimizer(model: nn.Module, recipe: StageRecipe) -> torch.optim.AdamW:
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


def lr_at(step: int, recipe: StageRecipe) -> float:
    """Linear warm-up to lr, then a cosine decay to min_lr at the last step."""
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    span = max(1, recipe.steps - recipe.warmup_steps)
    progress = min(1.0, (step - recipe.warmup_steps) / span)
    return recipe.min_lr + 0.5 * (recipe.lr - recipe.min_lr) * (1 + math.cos(math.pi * progress))
