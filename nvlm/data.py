"""Training data: JSONL conversations streamed from disk, weighted mixtures, packing into rows.

A JSONL line is one sample:
    {"image": "img/0.png" | ["a.png", "b.png"] (optional),
     "conversations": [{"from": "human", "value": "<image>\\nWhat is the code?"},
                       {"from": "gpt", "value": "4821"}]}
Image paths are relative to the JSONL file's folder, or to `image_root` when given. Lines without
"image" are text-only samples. An optional "glyphs" list ([char, left, top, right, bottom] per
character, in image pixels and reading order) feeds the vision warm-up stage (nvlm.warmup); the
other stages ignore it.

The pipeline is deterministic and resumable: `SampleStream` draws each sample's source from a
seeded RNG (weights from `--data a.jsonl:0.8,b.jsonl:0.2`), reads the next line of that source
(files loop forever, epoch after epoch), and turns it into model inputs with the processor;
`RowPacker` fills rows of at most `seq_len` tokens. Their `state_dict()` is the position just before
the first sample not yet handed out, so a resumed run sees exactly the samples the uninterrupted
run would have seen. Nothing is loaded whole: a source keeps a byte offset into its file.

Bad data never stops a run: an unparsable line, a sample whose images cannot be read or whose
placeholders do not match its images, and a sample longer than a row are skipped and counted (a
warning names the first few). A file in which most lines are bad is an error.

`python -m nvlm.data synth --out DIR --n N` writes the built-in synthetic task (see nvlm.synth).
"""

from __future__ import annotations

import json
import logging
import random
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .processing import NVLMProcessor, ProcessedSample, load_image

log = logging.getLogger("nvlm.data")

# A source whose first lines are mostly bad is an error rather than a run that trains on nothing:
# after this many lines, more than half of them bad stops the run.
_BAD_LINE_CHECK_AFTER = 32
_WARNINGS_PER_KIND = 3


@dataclass
class Record:
    """One parsed JSONL line."""

    conversations: list[dict[str, Any]]
    images: list[Path]
    where: str          # "file:line", for messages
    extra: dict[str, Any] = field(default_factory=dict)   # the fields asked for by extra_fields


@dataclass
class DataSpec:
    """One `path[:weight]` entry of --data."""

    path: Path
    weight: float = 1.0


def parse_data_spec(spec: str | Sequence[str]) -> list[DataSpec]:
    """`a.jsonl:0.8,b.jsonl:0.2` (or a list of such entries) -> DataSpecs; weights default to 1."""
    entries = spec.split(",") if isinstance(spec, str) else list(spec)
    result = []
    for entry in (e.strip() for e in entries):
        if not entry:
            continue
        path, weight = entry, 1.0
        head, sep, tail = entry.rpartition(":")
        if sep and head:
            try:
                path, weight = head, float(tail)
            except ValueError:
                path = entry      # a ':' that is part of the path
        if weight <= 0:
            raise ValueError(f"--data: weight of {path!r} must be > 0, got {weight}")
        result.append(DataSpec(Path(path), weight))
    if not result:
        raise ValueError(f"--data: expected 'file.jsonl[:weight],...', got {spec!r}")
    for d in result:
        if not d.path.is_file():
            raise ValueError(f"--data: {str(d.path)!r} is not a file")
    return result


class SkipCounter:
    """Counts skipped samples by reason and logs the first few of each kind."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def skip(self, reason: str, detail: str) -> None:
        self.counts[reason] += 1
        if self.counts[reason] <= _WARNINGS_PER_KIND:
            log.warning("skipped (%s): %s", reason, detail)

    def total(self) -> int:
        return sum(self.counts.values())


class JsonlSource:
    """Streams Records from one JSONL file, forever (epochs), keeping only a byte offset."""

    def __init__(self, path: Path, image_root: Path | None, skips: SkipCounter,
                 extra_fields: Sequence[str] = ()) -> None:
        self.path = Path(path)
        self.extra_fields = tuple(extra_fields)
        self.image_root = Path(image_root) if image_root is not None else self.path.parent
        self.skips = skips
        self.offset, self.epoch, self.line = 0, 0, 0
        self.good_lines, self.bad_lines = 0, 0
        self._file = None

    def state_dict(self) -> dict[str, int]:
        return {"offset": self.offset, "epoch": self.epoch, "line": self.line}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.offset, self.epoch, self.line = state["offset"], state["epoch"], state["line"]
        if self._file is not None:
            self._file.seek(self.offset)

    def next_record(self) -> Record:
        while True:
            if self._file is None:
                self._file = open(self.path, "rb")   # noqa: SIM115 - kept open while streaming
                self._file.seek(self.offset)
            raw = self._file.readline()
            self.offset = self._file.tell()
            if not raw:
                if self.good_lines == 0:
                    raise ValueError(f"{self.path}: no usable sample in the whole file "
                                     f"({self.bad_lines} bad lines)")
                self.offset, self.line, self.epoch = 0, 0, self.epoch + 1
                self._file.seek(0)
                continue
            self.line += 1
            if not raw.strip():
                continue
            where = f"{self.path}:{self.line}"
            try:
                record = self._parse(raw, where)
            except ValueError as err:
                self.bad_lines += 1
                self.skips.skip("bad line", str(err))
                self._check_mostly_bad()
                continue
            self.good_lines += 1
            return record

    def _check_mostly_bad(self) -> None:
        seen = self.good_lines + self.bad_lines
        if self.epoch == 0 and seen >= _BAD_LINE_CHECK_AFTER and self.bad_lines * 2 > seen:
            raise ValueError(f"{self.path}: {self.bad_lines} of the first {seen} lines are bad "
                             "(see the warnings above); fix the file or remove it from --data")

    def _parse(self, raw: bytes, where: str) -> Record:
        try:
            item = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{where}: not valid JSON ({err})") from None
        if not isinstance(item, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(item).__name__}")
        conversations = item.get("conversations")
        if not isinstance(conversations, list) or not conversations:
            raise ValueError(f"{where}: expected a non-empty 'conversations' list")
        roles = [turn.get("from", turn.get("role")) if isinstance(turn, dict) else None
                 for turn in conversations]
        if not any(role in ("gpt", "assistant") for role in roles):
            raise ValueError(f"{where}: no assistant ('gpt') turn, nothing to learn from")
        images = item.get("image", [])
        images = [images] if isinstance(images, str) else images
        if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
            raise ValueError(f"{where}: 'image' must be a path or a list of paths")
        extra = {name: item[name] for name in self.extra_fields if name in item}
        return Record(conversations, [self.image_root / p for p in images], where, extra)


class SampleStream:
    """Weighted, seeded mixture of JSONL sources turned into ProcessedSamples."""

    def __init__(self, specs: Sequence[DataSpec], processor: NVLMProcessor, seed: int,
                 max_len: int, max_tiles: int | None = None, image_root: Path | None = None) -> None:
        self.skips = SkipCounter()
        self.sources = [JsonlSource(s.path, image_root, self.skips) for s in specs]
        self.weights = [s.weight for s in specs]
        self.processor, self.max_len, self.max_tiles = processor, max_len, max_tiles
        self.rng = random.Random(seed)
        self.records_read, self.samples_out = 0, 0

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.getstate(), "sources": [s.state_dict() for s in self.sources],
                "records_read": self.records_read, "samples_out": self.samples_out}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.setstate(as_tuple(state["rng"]))
        for source, source_state in zip(self.sources, state["sources"], strict=True):
            source.load_state_dict(source_state)
        self.records_read, self.samples_out = state["records_read"], state["samples_out"]

    def __iter__(self) -> "SampleStream":
        return self

    def __next__(self) -> ProcessedSample:
        while True:
            self._check_mostly_skipped()
            source = self.rng.choices(self.sources, weights=self.weights)[0]
            record = source.next_record()
            self.records_read += 1
            try:
                images = [load_image(path) for path in record.images]
            except (ValueError, OSError) as err:
                self.skips.skip("unreadable image", f"{record.where}: {err}")
                continue
            try:
                sample = self.processor(record.conversations, images or None,
                                        max_tiles=self.max_tiles)
            except (ValueError, TypeError) as err:
                self.skips.skip("bad sample", f"{record.where}: {err}")
                continue
            if len(sample) > self.max_len:
                # Truncating would cut image placeholders or answers; the sample is dropped.
                self.skips.skip("longer than a row",
                                f"{record.where}: {len(sample)} tokens > row of {self.max_len}")
                continue
            self.samples_out += 1
            return sample

    def _check_mostly_skipped(self) -> None:
        # Usually a wrong --image-root (every image missing) or a row shorter than the samples.
        skipped = self.records_read - self.samples_out
        if self.records_read >= _BAD_LINE_CHECK_AFTER and skipped * 2 > self.records_read:
            raise ValueError(f"{skipped} of the first {self.records_read} samples were unusable "
                             f"({dict(self.skips.counts)}); check the image paths (--image-root) "
                             "and the row length (--seq-len)")


class RowPacker:
    """Greedy packing: samples in stream order into rows of at most seq_len tokens.

    A sample that does not fit the current row starts the next one. The state is the stream's
    state before that held-over sample, so resuming re-reads it.
    """

    def __init__(self, stream: SampleStream, seq_len: int) -> None:
        self.stream, self.seq_len = stream, seq_len
        self._held: ProcessedSample | None = None
        self._held_state: dict[str, Any] | None = None
        self.tokens, self.padding = 0, 0

    def state_dict(self) -> dict[str, Any]:
        stream_state = self._held_state if self._held is not None else self.stream.state_dict()
        return {"stream": stream_state, "tokens": self.tokens, "padding": self.padding}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state["stream"])
        self.tokens, self.padding = state["tokens"], state["padding"]
        self._held = self._held_state = None

    def next_row(self) -> list[ProcessedSample]:
        row: list[ProcessedSample] = []
        used = 0
        while True:
            if self._held is None:
                self._held_state = self.stream.state_dict()
                self._held = next(self.stream)
            if row and used + len(self._held) > self.seq_len:
                break
            row.append(self._held)
            used += len(self._held)
            self._held = None
        self.tokens += used
        self.padding += self.seq_len - used
        return row

    @property
    def padding_fraction(self) -> float:
        """Share of row capacity left empty so far (the cost of not splitting samples)."""
        total = self.tokens + self.padding
        return self.padding / total if total else 0.0


def as_tuple(value: Any) -> Any:
    """random.Random states come back from a checkpoint as lists; setstate wants tuples."""
    return tuple(as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


@dataclass
class EvalItem:
    question: str
    answer: str
    images: list[Path] = field(default_factory=list)


def load_eval_set(path: Path, n: int | None = None, image_root: Path | None = None) -> list[EvalItem]:
    """The first n samples of a JSONL file as (first question, first answer, images)."""
    skips = SkipCounter()
    source = JsonlSource(Path(path), image_root, skips)
    items: list[EvalItem] = []
    while n is None or len(items) < n:
        record = source.next_record()
        if source.epoch > 0:
            break
        turns = [(t.get("from", t.get("role")), t.get("value", t.get("content")))
                 for t in record.conversations]
        question = next(text for role, text in turns if role in ("human", "user"))
        answer = next(text for role, text in turns if role in ("gpt", "assistant"))
        items.append(EvalItem(question, answer, record.images))
    if n is not None and len(items) < n:
        raise ValueError(f"{path}: asked for {n} eval samples, the file has {len(items)}")
    return items


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    from . import synth

    parser = argparse.ArgumentParser(prog="python -m nvlm.data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("synth", help="write the synthetic high-resolution reading task")
    synth.add_arguments(p)
    args = parser.parse_args(argv)
    if args.command == "synth":
        paths = synth.write_task_from_args(args)
        for name, path in paths.items():
            print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
