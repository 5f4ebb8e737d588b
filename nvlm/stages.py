"""Training stages: what one optimizer step of a stage does, behind one small interface.

The trainer (nvlm/train.py) runs a list of stages with one loop: per step it sets the learning
rate, calls `stage.step()` (forward and backward of the step's data, gradients accumulated), clips
`stage.parameters` together with the model's trainable ones, steps the model's optimizer and
`stage.optimizers`, and saves `stage.state_dict()` in every checkpoint. A stage kind is a class
with that interface; the trainer's STAGE_KINDS names the class of each recipe stage.

- LanguageModelStage: the paper's stages (pretrain, SFT) and the text warm-up: packed rows of
  the stage's data through the whole model, next-token loss.
- nvlm.demo.warmup.VisionWarmupStage: the demo's vision warm-up (its own heads and data).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch
from torch import nn

from .data import DataSpec, RowPacker, SampleStream, SkipCounter
from .distributed import World
from .errors import InputError
from .packing import pack_samples
from .processing import NVLMProcessor
from .recipes import StageRecipe


@dataclass
class StepResult:
    loss: float                   # the step's mean loss over all its targets (all ranks)
    tokens: int                   # tokens (or image tokens) the step trained on, all ranks
    metrics: dict[str, Any]       # extra per-step metrics for metrics.jsonl


@dataclass
class StageContext:
    """What a stage is built from, besides its name and recipe."""

    model: nn.Module
    processor: NVLMProcessor
    specs: Sequence[DataSpec]     # the stage's data
    seed: int
    image_root: Path | None
    world: World
    micro_batch: int              # rows per forward pass on each rank
    autocast: Any                 # the context the forward passes run under


class Stage(Protocol):
    name: str
    recipe: StageRecipe
    skips: SkipCounter                 # samples its data passed over
    reports_lm_loss: bool              # its loss is the language model's (summary's train_loss)
    batch_unit: str                    # what global_batch counts, for the log
    parameters: list[nn.Parameter]     # trained by the stage besides the model's own
    optimizers: list[torch.optim.Optimizer]   # theirs

    def step(self) -> StepResult: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    # What the run's summary.json reports of the stage, from its rows of metrics.jsonl alone (so
    # that a resumed run, which does not rebuild its finished stages, reports the same).
    @staticmethod
    def summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]: ...


class LanguageModelStage:
    """Packed rows of text (and images) through the model, next-token loss on the answers.

    global_batch rows per step, split over the ranks, micro_batch rows per forward pass. The
    step's loss is the mean over all its targets on all ranks: each micro-batch's summed loss is
    divided by that global count (PackedBatch.num_targets, summed over ranks before any backward).
    """

    reports_lm_loss = True

    def __init__(self, name: str, recipe: StageRecipe, context: StageContext) -> None:
        self.name, self.recipe, self.context = name, recipe, context
        self.batch_unit = f"rows x {recipe.seq_len} tokens"
        stream = SampleStream(context.specs, context.processor, seed=context.seed,
                              max_len=recipe.seq_len, max_tiles=recipe.max_tiles,
                              image_root=context.image_root)
        self.skips = stream.skips
        self.packer = RowPacker(stream, recipe.seq_len)
        self.parameters: list[nn.Parameter] = []
        self.optimizers: list[torch.optim.Optimizer] = []

    @staticmethod
    def check_fits(name: str, recipe: StageRecipe, world: World, micro_batch: int) -> None:
        rows_per_rank, rem = divmod(recipe.global_batch, world.size)
        if rem or rows_per_rank % micro_batch:
            raise InputError(f"--global-batch {recipe.global_batch} (stage {name!r}): must "
                             f"split into {world.size} rank(s) x --micro-batch {micro_batch} "
                             "x accumulation")

    def step(self) -> StepResult:
        ctx, world = self.context, self.context.world
        rows = [self.packer.next_row() for _ in range(self.recipe.global_batch)]
        mine = rows[world.rank::world.size]
        batches = [pack_samples([s for row in mine[i:i + ctx.micro_batch] for s in row])
                   for i in range(0, len(mine), ctx.micro_batch)]
        counts = [b.num_targets for b in batches]   # counted once, on the host
        total_count, tokens = world.sum([sum(counts),
                                         sum(len(b) for b in batches)])
        loss_sum = 0.0
        for batch, count in zip(batches, counts):
            batch = batch.to(world.device)
            with ctx.autocast:
                output = ctx.model(batch.input_ids, batch.pixel_values, batch.labels,
                                   cu_seqlens=batch.cu_seqlens, position_ids=batch.position_ids,
                                   max_seqlen=batch.max_seqlen, xattn=batch.xattn,
                                   return_logits=False)
            # output.loss is this micro-batch's mean over its `count` targets; FSDP averages
            # gradients over ranks, hence the world size.
            (output.loss * (count * world.size / max(total_count, 1))).backward()
            loss_sum += float(output.loss.detach()) * count
        (loss_total,) = world.sum([loss_sum])
        return StepResult(loss_total / max(total_count, 1), int(tokens),
                          {"padding": self.packer.padding_fraction,
                           "samples": sum(map(len, rows))})

    def state_dict(self) -> dict[str, Any]:
        return {"data": self.packer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.packer.load_state_dict(state["data"])

    @staticmethod
    def summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """The share of the stage's rows left as padding, over the whole stage."""
        return {"padding_fraction": rows[-1]["padding"]} if rows else {}
