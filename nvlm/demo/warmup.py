"""The vision warm-up: a token-level OCR objective that gives a from-scratch ViT its head start.

NVLM starts from InternViT, whose pretraining taught it to read; the tiny demo model starts from
random weights. This stage stands in for that pretraining: the ViT learns, for every image token
(one pixel-shuffled cell of a tile), which character lies there and where it stands in the text.
Two linear heads read the pixel-shuffled ViT features, as the projector will:

- `char`: none, or the byte of the glyph whose centre falls in the cell;
- `ordinal`: none, or the glyph's index in the text (1-based, up to MAX_ORDINAL).

The two labels are deliberately separate (factorized): the decoder later has to find "the k-th
character" among a hundred image tokens and read it, and a feature that holds k and the character
in separate directions makes that one attention pattern plus one read-out. With a joint
(k, character) class per token the same from-scratch decoder stayed at chance for 1,900 steps
even with oracle features; factorized oracle features were learned in about 600.

The labels come from the data: a JSONL line's `glyphs` list ([char, left, top, right, bottom] in
image pixels, reading order), which the synthetic task writes (nvlm.demo.synth). Lines without glyphs
or without exactly one image are passed over. The heads are trained with the ViT and dropped at
the end of the stage; the model keeps no trace of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import nvlm_kernels

from ..config import NVLMConfig
from ..data import DataSpec, SkipCounter, SourceMixture
from ..distributed import World
from ..errors import InputError
from ..images import dynamic_tiles, image_to_tensor, load_image, tile_boxes
from ..packing import IGNORE_INDEX
from ..recipes import StageRecipe, build_optimizer
from ..stages import LanguageModelStage, StageContext, StepResult

MAX_ORDINAL = 15
NO_LABEL = 0          # class 0 of both heads: no glyph centre in this cell
IGNORE = IGNORE_INDEX  # a cell two different glyphs share (thumbnails): no label at all
# Tiles without any glyph are sampled at this rate: enough for the heads to learn "nothing here"
# without spending the stage on empty tiles.
EMPTY_TILE_RATE = 0.2


def parse_glyphs(value: Any, where: str) -> list[tuple[str, float, float, float, float]]:
    """A line's `glyphs` list, checked: each entry [char (one character), left, top, right,
    bottom] with left <= right and top <= bottom."""
    if not isinstance(value, list):
        raise InputError(f"{where}: 'glyphs' must be a list of [char, left, top, right, bottom]")
    glyphs = []
    for i, entry in enumerate(value):
        ok = (isinstance(entry, list) and len(entry) == 5 and isinstance(entry[0], str)
              and len(entry[0]) == 1 and all(isinstance(v, (int, float)) for v in entry[1:]))
        if not ok or entry[1] > entry[3] or entry[2] > entry[4]:
            raise InputError(f"{where}: glyphs[{i}]: expected [char, left, top, right, bottom] "
                             f"with left <= right and top <= bottom, got {entry!r}")
        glyphs.append((entry[0], *map(float, entry[1:])))
    return glyphs


def token_labels(glyphs: Sequence[tuple[str, float, float, float, float]], size: tuple[int, int],
                 config: NVLMConfig, max_tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (ordinal, char) classes of an image of `size` (W, H) as dynamic_tiles cuts it.

    Returns two (num_tiles, tokens_per_tile) int64 tensors, tokens in the projector's row-major
    order. A token gets glyph k's labels (ordinal k + 1, char byte + 1) when the centre of the
    glyph's box falls in its cell; NO_LABEL when no centre does; IGNORE when two glyphs' centres
    do (the squashed thumbnail) -- or, for the ordinal only, when k + 1 > MAX_ORDINAL.
    """
    side = config.vision.grid_size // config.projector.downsample_scale   # tokens per tile side
    boxes = tile_boxes(*size, tile_size=config.tile_size, max_tiles=max_tiles,
                       use_thumbnail=config.use_thumbnail)
    ordinal = torch.full((len(boxes), side * side), NO_LABEL, dtype=torch.int64)
    char = torch.full_like(ordinal, NO_LABEL)
    for k, (c, left, top, right, bottom) in enumerate(glyphs):
        code = c.encode("utf-8")
        cx, cy = (left + right) / 2, (top + bottom) / 2
        for t, (x0, y0, x1, y1) in enumerate(boxes):
            if not (x0 <= cx < x1 and y0 <= cy < y1):
                continue
            cell = (int((cy - y0) / (y1 - y0) * side) * side + int((cx - x0) / (x1 - x0) * side))
            if char[t, cell] != NO_LABEL:               # a second glyph in the same cell
                ordinal[t, cell] = char[t, cell] = IGNORE
                continue
            ordinal[t, cell] = k + 1 if k + 1 <= MAX_ORDINAL else IGNORE
            char[t, cell] = code[0] + 1 if len(code) == 1 else IGNORE
    return ordinal, char


class TokenOCRHeads(nn.Module):
    """LayerNorm + Linear heads over pixel-shuffled ViT features (C * scale^2 channels)."""

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.ordinal = nn.Sequential(nn.LayerNorm(in_features),
                                     nn.Linear(in_features, MAX_ORDINAL + 1))
        self.char = nn.Sequential(nn.LayerNorm(in_features), nn.Linear(in_features, 257))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ordinal(features), self.char(features)


@dataclass
class GlyphBatch:
    pixel_values: torch.Tensor    # (N, 3, S, S)
    ordinal: torch.Tensor         # (N, Q) int64
    char: torch.Tensor            # (N, Q) int64

    def to(self, device: torch.device) -> "GlyphBatch":
        return GlyphBatch(self.pixel_values.to(device), self.ordinal.to(device),
                          self.char.to(device))


class GlyphStream:
    """Weighted, seeded mixture of JSONL sources -> tiles with per-token OCR labels.

    Every tile that holds a glyph is kept, an empty tile at EMPTY_TILE_RATE; tiles of the batch's
    last image beyond `num_tiles` are dropped (the next batch starts with a new image). Lines
    without `glyphs` (text-only data) are passed over silently; if none of the first lines has
    any, the stage was pointed at the wrong data and says so.
    """

    def __init__(self, specs: Sequence[DataSpec], config: NVLMConfig, max_tiles: int, seed: int,
                 image_root: Path | None = None) -> None:
        self.skips = SkipCounter()
        self.mixture = SourceMixture(specs, seed, image_root, self.skips,
                                     extra_fields=("glyphs",))
        self.rng = self.mixture.rng   # one generator: the empty-tile draws resume with it
        self.config, self.max_tiles = config, max_tiles
        self.images_used = 0

    def state_dict(self) -> dict[str, Any]:
        return {**self.mixture.state_dict(), "images_used": self.images_used}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mixture.load_state_dict(state)
        self.images_used = state["images_used"]

    def next_batch(self, num_tiles: int) -> GlyphBatch:
        tiles, ordinals, chars = [], [], []
        while len(tiles) < num_tiles:
            for tile, ordinal, char in self._next_image():
                labelled = bool(((ordinal > NO_LABEL) | (char > NO_LABEL)).any())
                if labelled or self.rng.random() < EMPTY_TILE_RATE:
                    tiles.append(tile)
                    ordinals.append(ordinal)
                    chars.append(char)
        return GlyphBatch(torch.stack(tiles[:num_tiles]), torch.stack(ordinals[:num_tiles]),
                          torch.stack(chars[:num_tiles]))

    def _next_image(self):
        while True:
            if self.mixture.records_read >= 64 and self.images_used == 0:
                raise InputError("stage 'vision' found no line with 'glyphs' and one image in "
                                 f"the first {self.mixture.records_read} lines of its data; it "
                                 "needs glyph boxes (see nvlm.demo.synth)")
            record = self.mixture.next_record()
            glyphs = record.extra.get("glyphs")
            if glyphs is None or len(record.images) != 1:
                continue
            try:
                glyphs = parse_glyphs(glyphs, record.where)
                image = load_image(record.images[0])
            except (ValueError, OSError) as err:
                self.skips.skip("bad glyph sample", f"{record.where}: {err}")
                continue
            self.images_used += 1
            pixels = image_to_tensor(dynamic_tiles(image, self.config.tile_size, self.max_tiles,
                                                   self.config.use_thumbnail))
            ordinal, char = token_labels(glyphs, image.size, self.config, self.max_tiles)
            return list(zip(pixels, ordinal, char))


def ocr_loss(vision_model: nn.Module, heads: TokenOCRHeads, batch: GlyphBatch,
             scale: int) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum of the two heads' mean cross-entropies, and the share of glyph tokens whose ordinal and
    character both come out right (None in a batch without glyphs)."""
    features = nvlm_kernels.pixel_shuffle(vision_model(batch.pixel_values), scale)
    ordinal_logits, char_logits = heads(features)
    loss = sum(F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
               for logits, labels in ((ordinal_logits, batch.ordinal), (char_logits, batch.char)))
    with torch.no_grad():
        glyph = batch.char > NO_LABEL
        both = (ordinal_logits.argmax(-1) == batch.ordinal) & (char_logits.argmax(-1) == batch.char)
        accuracy = float(both[glyph].float().mean()) if glyph.any() else None
    return loss, {"glyph_accuracy": accuracy, "glyph_tokens": int(glyph.sum())}


class VisionWarmupStage:
    """The `vision` stage: global_batch tiles per step through the ViT and the two OCR heads.

    One process only (the heads live outside the FSDP-sharded model). The heads and their
    optimizer are the stage's own: trained, clipped and checkpointed with it, dropped after it.
    """

    reports_lm_loss = False
    batch_unit = "tiles"

    def __init__(self, name: str, recipe: StageRecipe, context: StageContext) -> None:
        self.name, self.recipe, self.context = name, recipe, context
        config = context.model.config
        self.stream = GlyphStream(context.specs, config, recipe.max_tiles, context.seed,
                                  context.image_root)
        self.skips = self.stream.skips
        self.heads = TokenOCRHeads(config.vision.hidden_size
                                   * config.projector.downsample_scale ** 2
                                   ).to(context.world.device)
        self.parameters = list(self.heads.parameters())
        self.optimizers = [build_optimizer(self.heads, recipe)]

    @staticmethod
    def check_fits(name: str, recipe: StageRecipe, world: World, micro_batch: int) -> None:
        if world.distributed:
            raise InputError(f"stage {name!r}: the vision warm-up runs in one process "
                             "(its heads live outside the FSDP-sharded model); run it alone "
                             "first, then --init the sharded run from its model/")

    def step(self) -> StepResult:
        model = self.context.model
        batch = self.stream.next_batch(self.recipe.global_batch).to(self.context.world.device)
        loss, stats = ocr_loss(model.vision_model, self.heads, batch,
                               model.config.projector.downsample_scale)
        loss.backward()
        return StepResult(float(loss.detach()),
                          batch.pixel_values.shape[0] * model.config.tokens_per_tile, stats)

    def state_dict(self) -> dict[str, Any]:
        return {"data": self.stream.state_dict(), "heads": self.heads.state_dict(),
                "heads_optimizer": self.optimizers[0].state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state["data"])
        self.heads.load_state_dict(state["heads"])
        self.optimizers[0].load_state_dict(state["heads_optimizer"])

    @staticmethod
    def summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Share of glyph tokens whose ordinal and character both came out right, last 10
        steps with glyphs."""
        accuracy = [r["glyph_accuracy"] for r in rows if r.get("glyph_accuracy") is not None]
        return {"vision_glyph_accuracy": sum(accuracy[-10:]) / len(accuracy[-10:])
                if accuracy else None}


class TextWarmupStage(LanguageModelStage):
    """The `text` stage: a language-model stage on the recall documents (nvlm.demo.synth). Its
    loss is on its own task, so the run's train_loss leaves it out (stage_losses has it)."""

    reports_lm_loss = False
