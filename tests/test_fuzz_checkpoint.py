"""Fuzzing how nvlm.checkpoint.load_pretrained reads safetensors headers and the shard index.

Bounded and deterministic: fixed seeds, a few hundred mutations of one tiny sharded checkpoint.
Every case must end, within CASE_SECONDS, in a load that gives the saved tensors back or in a
ValueError / OSError (load_pretrained's documented errors); anything else (a TypeError from deep
inside, a hang) fails the test with the mutation that caused it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import signal
import struct
import time
from pathlib import Path
from typing import Callable

import pytest
import torch

import nvlm.checkpoint as checkpoint
from nvlm.config import NVLMConfig
from nvlm.model import NVLM

# A case is a file read plus a tiny model build; on a slow, shared 2-core machine one takes
# ~15 ms when it loads and ~1 ms when it fails. The bound only catches hangs and blow-ups.
CASE_SECONDS = 2.0
INDEX = checkpoint.SAFETENSORS_INDEX_FILE

pytestmark = pytest.mark.skipif(not hasattr(signal, "setitimer"),
                                reason="the per-case time limit needs signal.setitimer")

Mutation = Callable[[random.Random, bytes], tuple[bytes, str]]


# --------------------------------------------------------------------------------------------
# The checkpoint and the harness

@dataclasses.dataclass
class Pristine:
    directory: Path
    files: dict[str, bytes]                 # file name -> its saved bytes
    shards: list[str]
    state_dict: dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Pristine:
    """One-layer ViT and LLM, 32 wide, sharded into a handful of files plus the index."""
    tiny = NVLMConfig.from_preset("tiny")
    config = dataclasses.replace(
        tiny, vision=dataclasses.replace(tiny.vision, num_layers=1, hidden_size=32, num_heads=1,
                                         intermediate_size=32),
        llm=dataclasses.replace(tiny.llm, num_layers=1, hidden_size=32, num_heads=2,
                                num_kv_heads=1, intermediate_size=32),
        projector=dataclasses.replace(tiny.projector, hidden_size=32)).validate()
    torch.manual_seed(0)
    model = NVLM(config)
    model.init_weights()
    directory = tmp_path_factory.mktemp("fuzz") / "ckpt"
    checkpoint.save_pretrained(model, directory, max_shard_bytes=40_000)
    files = {file.name: file.read_bytes() for file in directory.iterdir()}
    shards = sorted(name for name in files if name.endswith(".safetensors"))
    assert INDEX in files and len(shards) >= 3
    # Also the warm-up: the first load of a process pays for lazy imports (~2 s here).
    assert _differences(NVLM.from_pretrained(directory).state_dict(), model.state_dict()) is None
    return Pristine(directory, files, shards, model.state_dict())


class _CaseTimeout(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: float):
    """Interrupt a case that runs longer than `seconds` (at its next Python bytecode)."""
    def expire(signum, frame):
        raise _CaseTimeout(f"over {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _outcome(pristine: Pristine, file: str, content: bytes) -> str | None:
    """Load with `file` replaced by `content`; None when the load is correct or refused with a
    documented error, else what went wrong."""
    path = pristine.directory / file
    path.write_bytes(content)
    start = time.perf_counter()
    try:
        with _time_limit(CASE_SECONDS):
            loaded = NVLM.from_pretrained(pristine.directory)
        # Compared before the file is restored: CPU tensors that safetensors reads without a
        # cast are views of the file's memory map, so rewriting the file changes them.
        problem = _differences(loaded.state_dict(), pristine.state_dict)
        del loaded
    except (ValueError, OSError):
        problem = None
    except Exception as error:             # noqa: BLE001 - any other error is the finding
        problem = f"{type(error).__name__}: {str(error)[:300]}"
    finally:
        path.write_bytes(pristine.files[file])
    elapsed = time.perf_counter() - start
    return problem or (f"took {elapsed:.1f} s" if elapsed > CASE_SECONDS else None)


def _differences(state: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> str | None:
    if state.keys() != saved.keys():
        return f"loaded other tensors: {sorted(state.keys() ^ saved.keys())[:4]}"
    differ = [name for name, t in saved.items() if not torch.equal(state[name], t)]
    return f"loaded other values: {differ[:4]}" if differ else None


def _run(pristine: Pristine, seed: int, cases: int, pick_file: Callable[[random.Random], str],
         mutations: list[Mutation]) -> None:
    rng = random.Random(seed)
    failures = []
    for case in range(cases):
        file = pick_file(rng)
        mutate = rng.choice(mutations)
        content, description = mutate(rng, pristine.files[file])
        problem = _outcome(pristine, file, content)
        if problem:
            failures.append(f"case {case} ({file}: {mutate.__name__} {description}): {problem}")
    assert not failures, f"{len(failures)} of {cases} cases:\n" + "\n".join(failures[:10])


# --------------------------------------------------------------------------------------------
# Mutations of a safetensors file's header: the u64 length, then that many bytes of JSON

INTERESTING_BYTES = b'{}[]",:0 9-.eE+/\\\x00\xff'
INTERESTING_LENGTHS = [0, 1, 2, 7, 8, 2**31, 2**32, 2**60, 2**63, 2**64 - 1, 100_000_001]


def _header(content: bytes) -> tuple[int, bytes, bytes]:
    """(the length field, the JSON header, the data after it)."""
    (length,) = struct.unpack("<Q", content[:8])
    return length, content[8:8 + length], content[8 + length:]


def _with_header(header: bytes, data: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header + data


def substitute_header_bytes(rng: random.Random, content: bytes) -> tuple[bytes, str]:
    length, header, data = _header(content)
    mutated = bytearray(header)
    for _ in range(rng.randint(1, 3)):
        at = rng.randrange(len(mutated))
        mutated[at] = rng.choice(INTERESTING_BYTES) if rng.random() < 0.5 else rng.randrange(256)
    return _with_header(bytes(mutated), data), "substituted"


def flip_bits(rng: random.Random, content: bytes) -> tuple[bytes, str]:
    length, header, _ = _header(content)
    mutated = bytearray(content)
    positions = [rng.randrange(8 + length) for _ in range(rng.randint(1, 4))]
    for at in positions:
        mutated[at] ^= 1 << rng.randrange(8)
    return bytes(mutated), f"at {positions}"


def insert_or_delete_header_byte(rng: random.Random, content: bytes) -> tuple[bytes, str]:
    """The length field follows, so the JSON parser sees the edit instead of a length error."""
    length, header, data = _header(content)
    at = rng.randrange(len(header))
    if rng.random() < 0.5:
        return _with_header(header[:at] + bytes([rng.choice(INTERESTING_BYTES)]) + header[at:],
                            data), f"insert at {at}"
    return _with_header(header[:at] + header[at + 1:], data), f"delete at {at}"


def truncate(rng: random.Random, content: bytes) -> tuple[bytes, str]:
    length, _, _ = _header(content)
    end = rng.randrange(8 + length + 16)
    return content[:end], f"to {end} bytes"


def set_length(rng: random.Random, content: bytes) -> tuple[bytes, str]:
    length, _, _ = _header(content)
    value = rng.choice(INTERESTING_LENGTHS + [length - 1, length + 1, len(content) - 8,
                                              len(content)])
    return struct.pack("<Q", value) + content[8:], f"length {value}"


# (dtype, how its element count compares with float32's for the same bytes); Q4 is no dtype.
SAME_BYTES_AS_F32 = [("I32", 1), ("U32", 1), ("F16", 2), ("BF16", 2), ("I16", 2), ("F64", 0.5),
                     ("I64", 0.5), ("F8_E4M3", 4), ("U8", 4), ("BOOL", 4), ("Q4", 1)]


def edit_header_json(rng: random.Random, content: bytes) -> tuple[bytes, str]:
    """A structural edit of one tensor's entry (re-serialised, so it parses)."""
    _, header, data = _header(content)
    entries = json.loads(header)
    name = rng.choice(sorted(n for n in entries if n != "__metadata__"))
    entry = entries[name]
    edit = rng.randrange(8)
    if edit == 0:                           # another dtype, the same bytes (else any dtype)
        dtype, scale = rng.choice(SAME_BYTES_AS_F32)
        last = entry["shape"][-1] * scale
        if last == int(last):
            entry["dtype"], entry["shape"][-1] = dtype, int(last)
        else:
            entry["dtype"] = dtype
    elif edit == 1:
        entry["shape"] = [rng.choice([0, -1, 2**40, 2**63, 1.5, "4", None])] + entry["shape"][1:]
    elif edit == 2:
        entry["shape"] = entry["shape"][::-1] + [1]
    elif edit == 3:
        entry["data_offsets"] = [entry["data_offsets"][0], rng.choice([0, 2**62, -1, 10**30])]
    elif edit == 4:
        del entries[name]
    elif edit == 5:
        entries[name + "x"] = entries.pop(name)
    elif edit == 6:
        entries["__metadata__"] = rng.choice([{"format": 1}, [1], "pt", {"a": "b" * 1000}])
    else:
        entries[name] = rng.choice([None, [], "x", {"dtype": "F32"}])
    return _with_header(json.dumps(entries).encode(), data), f"edit {edit} of {name}"


# Structural edits twice as often: byte edits mostly end in safetensors' own header checks.
HEADER_MUTATIONS = [substitute_header_bytes, flip_bits, insert_or_delete_header_byte, truncate,
                    set_length, edit_header_json, edit_header_json]


def test_mutated_safetensors_headers_load_correctly_or_raise(pristine):
    _run(pristine, seed=1, cases=240, pick_file=lambda rng: rng.choice(pristine.shards),
         mutations=HEADER_MUTATIONS)


@pytest.mark.parametrize("length", [2**60, 2**63, 2**64 - 1, 100_000_001])
def test_a_huge_header_length_is_refused_from_the_length_alone(pristine, length):
    """safetensors refuses a header over 100 MB before reading it (so a length field cannot
    make the loader allocate); this pins that behaviour, which load_pretrained relies on."""
    shard = pristine.shards[0]
    (pristine.directory / shard).write_bytes(struct.pack("<Q", length) + b"{}")
    try:
        start = time.perf_counter()
        with pytest.raises(ValueError, match=f"{shard}.*header too large"):
            NVLM.from_pretrained(pristine.directory)
        assert time.perf_counter() - start < CASE_SECONDS
    finally:
        (pristine.directory / shard).write_bytes(pristine.files[shard])


# --------------------------------------------------------------------------------------------
# Mutations of model.safetensors.index.json

def substitute_index_bytes(rng: random.Random, content: bytes) -> tuple[bytes, str]:
    mutated = bytearray(content)
    positions = [rng.randrange(len(mutated)) for _ in range(rng.randint(1, 3))]
    for at in positions:
        mutated[at] = rng.choice(INTERESTING_BYTES) if rng.random() < 0.5 else rng.randrange(256)
    return bytes(mutated), f"at {positions}"


def insert_or_delete_index_byte(rng: random.Random, content: bytes) -> tuple[bytes, str]:
    at = rng.randrange(len(content))
    if rng.random() < 0.5:
        return content[:at] + bytes([rng.choice(INTERESTING_BYTES)]) + content[at:], f"+{at}"
    return content[:at] + content[at + 1:], f"-{at}"


def truncate_index(rng: random.Random, content: bytes) -> tuple[bytes, str]:
    end = rng.randrange(len(content))
    return content[:end], f"to {end} bytes"


def edit_weight_map(rng: random.Random, content: bytes) -> tuple[bytes, str]:
    """Point one entry somewhere else, or break the index's structure."""
    index = json.loads(content)
    weight_map = index["weight_map"]
    name = rng.choice(sorted(weight_map))
    shard = weight_map[name]
    targets = [f"../{shard}", f"../ckpt/{shard}", "/etc/passwd", "/proc/self/mem", "/dev/zero",
               "", ".", "..", f"{shard}/", f"./{shard}", f"sub/{shard}", f"{shard}\x00",
               shard.upper(), "config.json", INDEX, "model-99999-of-00001.safetensors", 7, None,
               [shard], {"file": shard}, sorted(set(weight_map.values()) - {shard})[0]]
    edit = rng.randrange(6)
    if edit == 0:
        weight_map[name] = rng.choice(targets)
    elif edit == 1:
        del weight_map[name]
    elif edit == 2:
        weight_map[name + ".extra"] = shard
    elif edit == 3:
        index["weight_map"] = rng.choice([None, [], list(weight_map.items()), "x"])
    elif edit == 4:
        index = rng.choice([[], "weight_map", None, {"metadata": index["metadata"]}])
    else:
        return b"[" * 100_000 + b"]" * 100_000, "nested 100000 deep"
    return json.dumps(index).encode(), f"edit {edit} of {name!r}"


INDEX_MUTATIONS = [substitute_index_bytes, insert_or_delete_index_byte, truncate_index,
                   edit_weight_map]


def test_mutated_index_loads_correctly_or_raises(pristine):
    _run(pristine, seed=2, cases=160, pick_file=lambda rng: INDEX, mutations=INDEX_MUTATIONS)
