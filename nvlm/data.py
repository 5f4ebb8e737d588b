"""Training data: JSONL conversations streamed from disk, weighted mixtures, packing into rows.

A JSONL line is one sample:
    {"image": "img/0.png" | ["a.png", "b.png"] (optional),
     "conversations": [{"from": "human", "value": "<image>\\nWhat is the code?"},
                       {"from": "gpt", "value": "4821"}]}
Image paths are relative to the JSONL file's folder, or to `image_root` (--image-root) when given,
and may not leave it: a path that climbs out with `..` is a bad line, and so is, when an image root
is given, an absolute path outside it (without one, an absolute path is used as written). The check
is on the path's text; symlinks inside the root are followed. Lines without "image" are text-only
samples. An optional "glyphs" list ([char, left, top, right, bottom] per
character, in image pixels and reading order) feeds the vision warm-up stage (nvlm.demo.warmup); the
other stages ignore it.

The pipeline is deterministic and resumable: `SampleStream` draws each sample's source from a
seeded RNG (weights from `--data a.jsonl:0.8,b.jsonl:0.2`), reads the next line of that source
(files loop forever, epoch after epoch), and turns it into model inputs with the processor;
`RowPacker` fills rows of at most `seq_len` tokens. Their `state_dict()` is the position just before
the first sample not yet handed out, so a resumed run sees exactly the samples the uninterrupted
run would have seen. Nothing is loaded whole: a source keeps a byte offset into its file.

Bad data never stops a run: an unparsable line, a line too long to be a row's sample (read past in
bounded chunks, never whole), a sample whose images cannot be read or whose placeholders do not
match its images, and a sample longer than a row (refused from the image headers before decoding
when its images alone do not fit) are skipped and counted (a warning names the first few, with
file and line). A file in which most lines are bad is an error: after its first 32 lines, or at
its end for a shorter file.

`python -m nvlm.data synth --out DIR --n N` writes the built-in synthetic task (see nvlm.demo.synth).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .config import check_max_tiles
from .errors import InputError
from .images import ImageError, regular_file_problem
from .packing import ProcessedSample
from .processing import NVLMProcessor, SampleTooLong

log = logging.getLogger("nvlm.data")

# A source whose first lines are mostly bad is an error rather than a run that trains on nothing:
# after this many lines, more than half of them bad stops the run.
_BAD_LINE_CHECK_AFTER = 32
_WARNINGS_PER_KIND = 3
# A line longer than max(MIN_LINE_BYTES, LINE_BYTES_PER_TOKEN * row tokens) is skipped unread.
# A token stands for ~1 byte of a line's JSON text with the byte tokenizer, ~4 with a BPE on
# English, ~12 on JSON-escaped CJK (\u4e2d is 6 bytes); 64 leaves room for long whitespace tokens
# and fields no stage reads, so a longer line would not fit its row anyway. Reading and tokenizing
# a line costs ~50 bytes of memory per byte: 50 MB at the 1 MiB floor.
MIN_LINE_BYTES = 1 << 20
LINE_BYTES_PER_TOKEN = 64
_SKIP_CHUNK_BYTES = 1 << 16


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
        if not (math.isfinite(weight) and weight > 0):
            raise InputError(f"--data: weight of {path!r} must be a finite number > 0, "
                             f"got {weight}")
        result.append(DataSpec(Path(path), weight))
    if not result:
        raise InputError(f"--data: expected 'file.jsonl[:weight],...', got {spec!r}")
    for d in result:
        check_input_file(d.path, "--data")
    return result


def check_input_file(path: str | Path, flag: str) -> Path:
    """`path` as a Path if it is a readable regular file; else InputError naming `flag` and why
    ("does not exist", "is a directory", "is not a regular file (a named pipe)", ...)."""
    problem = regular_file_problem(path)
    if problem is not None:
        raise InputError(f"{flag}: {str(path)!r} is not a file: it {problem}")
    try:
        open(path, "rb").close()
    except OSError as err:
        raise InputError(f"{flag}: {str(path)!r} cannot be read ({err.strerror})") from None
    return Path(path)


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
    """Streams Records from one JSONL file, forever (epochs), keeping only a byte offset.

    Lines longer than max_line_bytes are skipped ("line too long") without being held whole.
    """

    def __init__(self, path: Path, image_root: Path | None, skips: SkipCounter,
                 extra_fields: Sequence[str] = (), max_line_bytes: int = MIN_LINE_BYTES) -> None:
        self.path = Path(path)
        self.extra_fields = tuple(extra_fields)
        self.image_root = Path(image_root) if image_root is not None else self.path.parent
        # An absolute path is confined only to a root the user named (see the module docstring).
        self._absolute_paths_confined = image_root is not None
        self._root = os.path.abspath(self.image_root)
        self.max_line_bytes = max_line_bytes
        self.skips = skips
        self.offset, self.epoch, self.line = 0, 0, 0
        self.good_lines, self.bad_lines = 0, 0
        # Whether good_lines / bad_lines count from the file's first line (not after a resume
        # mid-file): only then do they say anything about the whole file.
        self._counts_from_start = True
        self._file = None

    def state_dict(self) -> dict[str, int]:
        return {"offset": self.offset, "epoch": self.epoch, "line": self.line}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.offset, self.epoch, self.line = state["offset"], state["epoch"], state["line"]
        self.good_lines, self.bad_lines = 0, 0
        self._counts_from_start = self.offset == 0
        if self._file is not None:
            self._file.seek(self.offset)

    def next_record(self) -> Record:
        while True:
            if self._file is None:
                self._file = open(self.path, "rb")   # noqa: SIM115 - kept open while streaming
                self._file.seek(self.offset)
            raw = self._file.readline(self.max_line_bytes + 1)
            if not raw:
                self._end_of_file()
                continue
            self.line += 1
            where = f"{self.path}:{self.line}"
            if len(raw) > self.max_line_bytes and not raw.endswith(b"\n"):
                length = len(raw) + self._skip_rest_of_line()
                self.offset = self._file.tell()
                self._bad_line("line too long", f"{where}: {length} bytes, over the "
                                                f"{self.max_line_bytes} a line may have here")
                continue
            self.offset = self._file.tell()
            if not raw.strip():
                continue
            try:
                record = self._parse(raw, where)
            except ValueError as err:
                self._bad_line("bad line", str(err))
                continue
            self.good_lines += 1
            return record

    def _skip_rest_of_line(self) -> int:
        skipped = 0
        while chunk := self._file.readline(_SKIP_CHUNK_BYTES):
            skipped += len(chunk)
            if chunk.endswith(b"\n"):
                break
        return skipped

    def _bad_line(self, reason: str, detail: str) -> None:
        self.bad_lines += 1
        self.skips.skip(reason, detail)
        seen = self.good_lines + self.bad_lines
        if (self._counts_from_start and self.epoch == 0 and seen >= _BAD_LINE_CHECK_AFTER
                and self.bad_lines * 2 > seen):
            raise InputError(f"{self.path}: {self.bad_lines} of the first {seen} lines are bad "
                             "(see the warnings above); fix the file or remove it from --data")

    def _end_of_file(self) -> None:
        if self._counts_from_start:
            seen = self.good_lines + self.bad_lines
            if self.good_lines == 0:
                raise InputError(f"{self.path}: no usable sample in the whole file "
                                 f"({self.bad_lines} bad lines)")
            if self.bad_lines * 2 > seen:
                raise InputError(f"{self.path}: {self.bad_lines} of its {seen} lines are bad "
                                 "(see the warnings above); fix the file or remove it from --data")
        else:
            # Resumed mid-file: the counts miss the lines before the resume point; the next
            # pass starts at the first line and judges the whole file.
            self.good_lines, self.bad_lines = 0, 0
            self._counts_from_start = True
        self.offset, self.line, self.epoch = 0, 0, self.epoch + 1
        self._file.seek(0)

    def _parse(self, raw: bytes, where: str) -> Record:
        try:
            item = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise InputError(f"{where}: not valid JSON ({err})") from None
        except RecursionError:
            raise InputError(f"{where}: not valid JSON (nested too deeply)") from None
        if not isinstance(item, dict):
            raise InputError(f"{where}: expected a JSON object, got {type(item).__name__}")
        conversations = item.get("conversations")
        if not isinstance(conversations, list) or not conversations:
            raise InputError(f"{where}: expected a non-empty 'conversations' list")
        for i, turn in enumerate(conversations):   # the processor's TypeErrors are for bugs
            text = turn.get("value", turn.get("content")) if isinstance(turn, dict) else None
            if not isinstance(text, str):
                raise InputError(f"{where}: conversations[{i}]: expected an object with a text "
                                 "('value' or 'content')")
        roles = [turn.get("from", turn.get("role")) for turn in conversations]
        if not any(role in ("gpt", "assistant") for role in roles):
            raise InputError(f"{where}: no assistant ('gpt') turn, nothing to learn from")
        images = item.get("image", [])
        images = [images] if isinstance(images, str) else images
        if not isinstance(images, list) or not all(isinstance(p, str) and "\0" not in p
                                                   for p in images):
            raise InputError(f"{where}: 'image' must be a path or a list of paths")
        extra = {name: item[name] for name in self.extra_fields if name in item}
        return Record(conversations, [self._image_path(p, where) for p in images], where, extra)

    def _image_path(self, name: str, where: str) -> Path:
        if os.path.isabs(name) and not self._absolute_paths_confined:
            return Path(name)
        full = os.path.normpath(os.path.join(self._root, name))
        if os.path.commonpath([full, self._root]) != self._root:
            raise InputError(f"{where}: image path {name!r} is outside the image root "
                             f"{str(self.image_root)!r}; image paths must stay under it")
        return self.image_root / name


class SourceMixture:
    """A seeded, weighted choice among JSONL sources, one record at a time. Its state (the
    generator, each source's place, the records read) resumes the sequence exactly."""

    def __init__(self, specs: Sequence[DataSpec], seed: int, image_root: Path | None,
                 skips: SkipCounter, **source_options: Any) -> None:
        self.sources = [JsonlSource(s.path, image_root, skips, **source_options) for s in specs]
        self.weights = [s.weight for s in specs]
        self.rng = random.Random(seed)
        self.records_read = 0

    def next_record(self) -> Record:
        source = self.rng.choices(self.sources, weights=self.weights)[0]
        record = source.next_record()
        self.records_read += 1
        return record

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.getstate(), "sources": [s.state_dict() for s in self.sources],
                "records_read": self.records_read}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.setstate(as_tuple(state["rng"]))
        for source, source_state in zip(self.sources, state["sources"], strict=True):
            source.load_state_dict(source_state)
        self.records_read = state["records_read"]


class SampleStream:
    """Weighted, seeded mixture of JSONL sources turned into ProcessedSamples."""

    def __init__(self, specs: Sequence[DataSpec], processor: NVLMProcessor, seed: int,
                 max_len: int, max_tiles: int | None = None, image_root: Path | None = None) -> None:
        if max_tiles is not None:
            # A bad tile count is the run's error, not every sample's (nor 32 skips later).
            check_max_tiles(max_tiles)
        self.skips = SkipCounter()
        max_line_bytes = max(MIN_LINE_BYTES, LINE_BYTES_PER_TOKEN * max_len)
        self.mixture = SourceMixture(specs, seed, image_root, self.skips,
                                     max_line_bytes=max_line_bytes)
        self.processor, self.max_len, self.max_tiles = processor, max_len, max_tiles
        self.samples_out = 0

    def state_dict(self) -> dict[str, Any]:
        return {**self.mixture.state_dict(), "samples_out": self.samples_out}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mixture.load_state_dict(state)
        self.samples_out = state["samples_out"]

    def __iter__(self) -> "SampleStream":
        return self

    def __next__(self) -> ProcessedSample:
        while True:
            self._check_mostly_skipped()
            record = self.mixture.next_record()
            try:
                # The processor decodes the images one at a time, none if their headers show
                # they cannot fit a row.
                sample = self.processor(record.conversations, record.images or None,
                                        max_tiles=self.max_tiles, max_len=self.max_len)
            except SampleTooLong as err:
                self.skips.skip("longer than a row", f"{record.where}: {err}")
                continue
            except (ImageError, OSError) as err:
                self.skips.skip("unreadable image", f"{record.where}: {err}")
                continue
            except InputError as err:   # the processor's refusals; anything else is a bug
                self.skips.skip("bad sample", f"{record.where}: {err}")
                continue
            self.samples_out += 1
            return sample

    def _check_mostly_skipped(self) -> None:
        # Usually a wrong --image-root (every image missing) or a row shorter than the samples.
        records_read = self.mixture.records_read
        skipped = records_read - self.samples_out
        if records_read >= _BAD_LINE_CHECK_AFTER and skipped * 2 > records_read:
            raise InputError(f"{skipped} of the first {records_read} samples were unusable "
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
                 for t in record.conversations if isinstance(t, dict)]
        question = next((text for role, text in turns if role in ("human", "user")), None)
        answer = next((text for role, text in turns if role in ("gpt", "assistant")), None)
        if not (isinstance(question, str) and isinstance(answer, str)):
            skips.skip("bad eval line", f"{record.where}: expected a user question and an "
                                        "assistant answer, both text")
            continue
        items.append(EvalItem(question, answer, record.images))
    if n is not None and len(items) < n:
        raise InputError(f"{path}: asked for {n} eval samples, the file has {len(items)}")
    return items


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    from .demo import synth

    parser = argparse.ArgumentParser(prog="python -m nvlm.data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("synth", help="write the synthetic high-resolution reading task")
    synth.add_arguments(p)
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:      # --help (0), or a bad flag (2): argparse printed why
        return done.code
    if args.command == "synth":
        try:
            paths = synth.write_task_from_args(args)
        except OSError as err:            # a folder that cannot be written: disk, permissions
            print(f"error: --out: {err}", file=sys.stderr)
            return 2
        for name, path in paths.items():
            print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
