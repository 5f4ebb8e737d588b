"""The built-in synthetic task: read a short code printed small somewhere in a large image.

    python -m nvlm.data synth --out data/synth --n 20000

Each image is a canvas several tiles wide with a few digits in small type at a random place; the
question asks for the code, the answer is the code. At the thumbnail's resolution (the whole
canvas squashed to one tile) the glyphs are a few pixels wide, so a model has to read the
high-resolution tiles: the task shows what NVLM's dynamic tiling buys, with no download. The
answer space (10^digits codes) makes guessing without the image hopeless.

Layout. The code is written with one glyph per image token: the glyph pitch is the side of the
image area one token covers after the pixel shuffle (`cell`, 28 px for the tiny preset's 112-px
tiles), the code sits on one token row of one random tile at a random column, and each glyph is
centred in its cell with a little jitter. A from-scratch ViT with 14-px patches learns to read
glyphs that sit at a stable phase of its patch grid within a minute on a CPU; at free sub-patch
offsets it needs far more data than the demo's budget (measured: 30% token accuracy after 300
steps with +-3 px jitter, 12% at free placement, against 89% aligned). Every line also records
the glyph boxes (`glyphs`: [char, left, top, right, bottom] in image pixels, in reading order),
the labels of the demo's vision warm-up (nvlm.demo.warmup) -- our stand-in for the OCR pretraining
of NVLM's InternViT.

Also written: a text-only set (copy a code given in the question) that stands in for the SFT
blend's text data; the text warm-up's documents (`recall.jsonl`, see write_recall_split), which
stand in for the pretraining of NVLM's LLM; and a held-out eval split drawn with a different seed.
Everything is a pure function of the seed.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..errors import InputError
from ..files import atomic_file

QUESTION = "What is the code in the image?"
RECALL_QUESTION = "What is the code in the text?"
# The recall documents grow from a bare code to full size over this share of the file.
RECALL_RAMP = 0.3
_FILLER_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_FILLER_MARKS = ".-_ ~*#="
# Recall documents written with the task: the demo's text warm-up reads 7-20 per step (small
# ones first) for 800 steps, about 8,000, so the file does not wrap around to its easy start.
RECALL_N = 20_000


@dataclass
class TaskSpec:
    canvas: tuple[int, int] = (336, 224)     # W x H: a 3 x 2 grid of 112-px tiles (+ thumbnail)
    tile: int = 112                          # tile side of the model that reads it
    cell: int = 28                           # image side of one token: glyph pitch and grid
    font_sizes: tuple[int, int] = (16, 16)   # glyph size range in pixels (inclusive)
    digits: int = 3
    jitter: int = 0                          # +- pixels a glyph may move off its cell's centre

    def validate(self) -> "TaskSpec":
        width, height = self.canvas
        if self.digits < 3:
            raise InputError("digits: expected >= 3 (so that guessing stays hopeless), "
                             f"got {self.digits}")
        if self.font_sizes[0] > self.font_sizes[1] or self.font_sizes[0] < 6:
            raise InputError(f"font_sizes: expected 6 <= lo <= hi, got {self.font_sizes}")
        if self.cell < 1 or self.tile % self.cell:
            raise InputError(f"cell: expected a divisor of tile = {self.tile}, got {self.cell}")
        if self.digits > self.tile // self.cell:
            raise InputError(f"digits: at most {self.tile // self.cell} fit on one row of a "
                             f"{self.tile}-px tile with {self.cell}-px cells, got {self.digits}")
        if width % self.tile or height % self.tile:
            raise InputError(f"canvas: expected multiples of tile = {self.tile}, got {self.canvas}")
        if not 0 <= self.jitter <= self.cell // 4:
            raise InputError(f"jitter: expected 0..{self.cell // 4}, got {self.jitter}")
        return self


Glyph = tuple[str, int, int, int, int]       # char, left, top, right, bottom (image pixels)


def render(rng: random.Random, spec: TaskSpec) -> tuple[Image.Image, str, list[Glyph]]:
    """One image, its code and the box of each glyph (reading order)."""
    code = "".join(rng.choice("0123456789") for _ in range(spec.digits))
    width, height = spec.canvas
    background = rng.randint(200, 255)
    image = Image.new("RGB", (width, height), (background,) * 3)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=rng.randint(*spec.font_sizes))
    cells_per_tile = spec.tile // spec.cell
    tile = rng.randrange((width // spec.tile) * (height // spec.tile))
    tile_x = (tile % (width // spec.tile)) * spec.tile
    tile_y = (tile // (width // spec.tile)) * spec.tile
    row = rng.randrange(cells_per_tile)
    first = rng.randrange(cells_per_tile - spec.digits + 1)
    ink = rng.randint(0, 80)
    glyphs: list[Glyph] = []
    for k, char in enumerate(code):
        x0, y0, x1, y1 = draw.textbbox((0, 0), char, font=font)
        centre_x = tile_x + (first + k) * spec.cell + spec.cell // 2
        centre_y = tile_y + row * spec.cell + spec.cell // 2
        centre_x += rng.randint(-spec.jitter, spec.jitter)
        centre_y += rng.randint(-spec.jitter, spec.jitter)
        x, y = centre_x - (x0 + x1) // 2, centre_y - (y0 + y1) // 2
        draw.text((x, y), char, font=font, fill=(ink,) * 3)
        glyphs.append((char, x + x0, y + y0, x + x1, y + y1))
    return image, code, glyphs


def _conversation(question: str, answer: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def write_split(folder: Path, name: str, n: int, seed: int, spec: TaskSpec) -> Path:
    """n rendered samples: images under folder/images/name/, lines in folder/name.jsonl."""
    rng = random.Random(seed)
    image_dir = folder / "images" / name
    image_dir.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.jsonl"
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        for i in range(n):
            image, code, glyphs = render(rng, spec)
            relative = f"images/{name}/{i:06d}.png"
            image.save(folder / relative, compress_level=1)
            f.write(json.dumps({"image": relative,
                                "conversations": _conversation(f"<image>\n{QUESTION}", code),
                                "glyphs": [list(g) for g in glyphs]}) + "\n")
    return path


def write_text_split(folder: Path, n: int, seed: int, spec: TaskSpec) -> Path:
    """Text-only samples: copy the code given in the question (the LM's half of the skill)."""
    rng = random.Random(seed)
    path = folder / "text.jsonl"
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        for _ in range(n):
            code = "".join(rng.choice("0123456789") for _ in range(spec.digits))
            f.write(json.dumps({"conversations": _conversation(
                f"The code is {code}. {QUESTION}", code)}) + "\n")
    return path


def recall_document(rng: random.Random, size: float, digits: int) -> tuple[str, str]:
    """One document of the text warm-up and its code. `size` in [0, 1] scales it from a bare code
    (0) to up to 9 lines of up to 24 filler characters (1), with lone distractor digits and
    numbered lines."""
    lines = rng.randint(1, 1 + round(8 * size))
    width = rng.randint(digits, digits + 1 + round(20 * size))
    alphabet = _FILLER_LETTERS if rng.random() < 0.5 else rng.choice(_FILLER_MARKS)
    rows = [[rng.choice(alphabet) for _ in range(width)] for _ in range(lines)]
    code = "".join(rng.choice("0123456789") for _ in range(digits))
    row, column = rng.randrange(lines), rng.randrange(width - digits + 1)
    rows[row][column:column + digits] = list(code)
    # Lone digits that are not the code (the prompt of an image sample has them too: the tile
    # tags' numbers, a glyph squashed into the thumbnail): the code is the run of digits.
    for _ in range(rng.choice((0, 0, 1, 2, 3)) if size > 0 else 0):
        r, c = rng.randrange(lines), rng.randrange(width)
        if not any(ch.isdigit() for ch in rows[r][max(c - 1, 0):c + 2]):
            rows[r][c] = rng.choice("0123456789")
    label = rng.choice((None, "{}: ", "[{}]", "({}) ")) if size > 0 else None
    text = "\n".join((label.format(k + 1) if label else "") + "".join(chars)
                     for k, chars in enumerate(rows))
    return text, code


def write_recall_split(folder: Path, n: int, seed: int, spec: TaskSpec) -> Path:
    """The text warm-up's data: find the code hidden in a document of filler and copy it.

    NVLM starts from a pretrained LLM, which can find a string in its context and copy it out
    (induction heads); the tiny demo's decoder starts from random weights. These documents teach
    that skill on text alone, before the decoder ever sees an image: a run of `spec.digits`
    digits somewhere in lines of letters or marks, lone distractor digits and line numbers around
    it. The file is a curriculum, read in order: it grows from a bare code to full-size documents
    over its first RECALL_RAMP. (Measured on the demo: from random weights, full-size documents
    alone take ~1,200 steps to reach a loss of 0.25; the curriculum reaches 0.03 in ~600.)
    """
    rng = random.Random(seed)
    path = folder / "recall.jsonl"
    ramp = max(RECALL_RAMP * n, 1)
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        for i in range(n):
            text, code = recall_document(rng, min(1.0, i / ramp), spec.digits)
            f.write(json.dumps({"conversations": _conversation(
                f"{text}\n{RECALL_QUESTION}", code)}) + "\n")
    return path


def task_paths(folder: Path) -> dict[str, Path]:
    folder = Path(folder)
    return {"train": folder / "train.jsonl", "eval": folder / "eval.jsonl",
            "text": folder / "text.jsonl", "recall": folder / "recall.jsonl",
            "spec": folder / "spec.json"}


def write_task(folder: Path, train_n: int, eval_n: int, seed: int = 0,
               spec: TaskSpec | None = None, text_n: int | None = None,
               recall_n: int = RECALL_N) -> dict[str, Path]:
    """The whole task: train / eval (held out: another seed) / text-only / recall splits and
    spec.json."""
    spec = (spec or TaskSpec()).validate()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_split(folder, "train", train_n, seed, spec)
    write_split(folder, "eval", eval_n, seed + 1_000_003, spec)
    write_text_split(folder, text_n if text_n is not None else max(train_n // 4, 1), seed + 2, spec)
    write_recall_split(folder, recall_n, seed + 3, spec)
    paths = task_paths(folder)
    record = {"train_n": train_n, "eval_n": eval_n, "recall_n": recall_n, "seed": seed,
              "spec": asdict(spec)}
    paths["spec"].write_text(json.dumps(record, indent=2))
    return paths


def ensure_task(folder: Path, train_n: int, eval_n: int, seed: int = 0,
                spec: TaskSpec | None = None) -> dict[str, Path]:
    """write_task unless the folder already holds the same task (spec.json written last)."""
    paths = task_paths(folder)
    want = {"train_n": train_n, "eval_n": eval_n, "recall_n": RECALL_N, "seed": seed,
            "spec": asdict((spec or TaskSpec()).validate())}
    if paths["spec"].is_file():
        try:
            have = json.loads(paths["spec"].read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise InputError(f"{paths['spec']}: not valid JSON ({err}); delete the folder's "
                             "task to write it anew") from None
        if isinstance(have, dict) and isinstance(have.get("spec"), dict):   # else: rewrite it
            have["spec"] = {k: tuple(v) if isinstance(v, list) else v
                            for k, v in have["spec"].items()}
            if have == want:
                return paths
    return write_task(folder, train_n, eval_n, seed, spec)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `python -m nvlm.data synth`, each checked while parsing (see nvlm.flags)."""
    from ..flags import int_flag, output_dir_flag, seed_flag

    parser.add_argument("--out", type=output_dir_flag, required=True,
                        help="folder to write the task into")
    parser.add_argument("--n", type=int_flag(1), default=20_000, help="training samples")
    parser.add_argument("--eval-n", type=int_flag(1), default=500, help="held-out samples")
    parser.add_argument("--seed", type=seed_flag, default=0)
    parser.add_argument("--digits", type=_digits_flag, default=TaskSpec.digits,
                        help="length of the code to read")


def _digits_flag(text: str) -> int:
    try:
        digits = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    try:
        TaskSpec(digits=digits).validate()
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return digits


def write_task_from_args(args: argparse.Namespace) -> dict[str, Path]:
    return write_task(Path(args.out), args.n, args.eval_n, args.seed, TaskSpec(digits=args.digits))
