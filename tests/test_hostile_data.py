"""Hostile inputs at the edges: tile counts, oversized lines and images, CLI flags, paths that
leave the image root, non-regular files, small mostly-bad files, JSON errors without a file name.

Every case is cheap: a "huge" line is a few MB, a "huge" image a flat PNG, and what must not
happen (tokenizing, decoding, reading a file whole) is observed directly: a counting tokenizer, a
counting PIL load, tracemalloc's peak.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageFile

from nvlm.__main__ import main as cli_main
from nvlm.config import MAX_TILES_LIMIT, NVLMConfig
from nvlm.data import (JsonlSource, SampleStream, SkipCounter, check_input_file, load_eval_set,
                       main as data_main, parse_data_spec)
from nvlm.images import candidate_grids, dynamic_tiles, find_grid, load_image, tile_boxes
from nvlm.processing import NVLMProcessor, SampleTooLong
from nvlm.demo import synth

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = NVLMConfig.from_preset("tiny")          # 112-px tiles, 16 tokens per tile


def answer(question: str = "<image>\nWhat is it?", reply: str = "A square.") -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": reply}]


def line(images=None, **kwargs) -> str:
    item = {"conversations": answer(**kwargs) if images or kwargs else answer("Say hi.", "hi")}
    if images is not None:
        item["image"] = images
    return json.dumps(item)


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def flat_png(path: Path, size: tuple[int, int]) -> Path:
    # One colour: a large image in a file of a few KB.
    Image.new("RGB", size, (30, 60, 90)).save(path, compress_level=9)
    return path


@pytest.fixture
def count_decodes(monkeypatch):
    """How many times PIL decodes an image's pixels (ImageFile.load), from now on."""
    calls = []
    original = ImageFile.ImageFile.load

    def counting_load(self):
        if self.tile:               # pixels still to decode (a second load() is a no-op)
            calls.append(self.size)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    return calls


# --- 1. Tile counts have a documented upper bound -------------------------------------------------

def test_max_tiles_limit_is_enforced_everywhere():
    assert 40 <= MAX_TILES_LIMIT <= 128         # above every published setting (6 to 40)
    too_many = [MAX_TILES_LIMIT + 1, 1000, 10**9]
    for max_tiles in too_many:
        for call in (lambda: candidate_grids(max_tiles),
                     lambda: find_grid(1000, 500, 448, max_tiles),
                     lambda: tile_boxes(1000, 500, 448, max_tiles),
                     lambda: dynamic_tiles(Image.new("RGB", (64, 32)), 28, max_tiles)):
            with pytest.raises(ValueError, match=rf"max_tiles: expected at most "
                                                 rf"{MAX_TILES_LIMIT}.*got {max_tiles}"):
                call()
        config = NVLMConfig.from_preset("tiny")
        config.max_tiles = max_tiles
        with pytest.raises(ValueError, match=rf"max_tiles: expected at most {MAX_TILES_LIMIT}"):
            config.validate()
        with pytest.raises(ValueError, match=rf"max_tiles: expected at most {MAX_TILES_LIMIT}"):
            NVLMConfig.from_dict({**TINY.to_dict(), "max_tiles": max_tiles})
        processor = NVLMProcessor.from_config(TINY)
        with pytest.raises(ValueError, match=rf"max_tiles: expected at most {MAX_TILES_LIMIT}"):
            processor(answer("Say hi.", "hi"), max_tiles=max_tiles)
    # The limit itself is allowed, and enumerating its candidates is instant.
    start = time.perf_counter()
    grids = candidate_grids(MAX_TILES_LIMIT)
    assert time.perf_counter() - start < 0.5
    assert all(c * r <= MAX_TILES_LIMIT for c, r in grids)
    assert len(grids) == sum(MAX_TILES_LIMIT // c for c in range(1, MAX_TILES_LIMIT + 1))
    assert find_grid(10_000, 100, 448, MAX_TILES_LIMIT) == (MAX_TILES_LIMIT, 1)


def test_data_stream_refuses_a_bad_tile_count_up_front(tmp_path):
    path = write_lines(tmp_path / "data.jsonl", [line()])
    processor = NVLMProcessor.from_config(TINY)
    with pytest.raises(ValueError, match=rf"max_tiles: expected at most {MAX_TILES_LIMIT}"):
        SampleStream(parse_data_spec(str(path)), processor, seed=0, max_len=300, max_tiles=1000)


def test_cli_tiles_refuses_too_many_tiles_up_front(tmp_path, capsys):
    image = flat_png(tmp_path / "photo.png", (64, 32))
    for value in ("1000", "1000000", str(MAX_TILES_LIMIT + 1), "0", "-3"):
        start = time.perf_counter()
        assert cli_main(["tiles", str(image), "--max-tiles", value]) == 2
        assert time.perf_counter() - start < 2
        err = capsys.readouterr().err
        assert "--max-tiles" in err and "Traceback" not in err
    assert cli_main(["tiles", str(image), "--max-tiles", str(MAX_TILES_LIMIT)]) == 0


# --- 3. One line or image cannot exhaust memory ---------------------------------------------------

def test_overlong_line_is_skipped_unread_and_untokenized(tmp_path, monkeypatch):
    huge = line(question="x" * 5_000_000, reply="y")        # 5 MB: far beyond a 300-token row
    path = write_lines(tmp_path / "data.jsonl", [line(), huge] + [line()] * 4)
    processor = NVLMProcessor.from_config(TINY)
    longest = []
    encode = processor.tokenizer.encode
    monkeypatch.setattr(processor.tokenizer, "encode",
                        lambda text: longest.append(len(text)) or encode(text))
    stream = SampleStream(parse_data_spec(str(path)), processor, seed=0, max_len=300)
    tracemalloc.start()
    try:
        samples = [next(stream) for _ in range(5)]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(samples) == 5
    assert stream.skips.counts == {"line too long": 1}
    assert max(longest) < 1000                # the 5 MB text never reached the tokenizer
    assert peak < 3_000_000, f"peak {peak} bytes: the long line was read whole"
    # The byte offset is past the long line: a resumed stream goes on after it.
    source = stream.mixture.sources[0]
    assert source.line == 6 and source.offset == path.stat().st_size


def test_line_bound_follows_the_row_budget(tmp_path):
    long_text = line(question="z" * 1_500_000, reply="y")   # 1.5 MB: above 1 MiB and 64 x 300 B
    path = write_lines(tmp_path / "data.jsonl", [line(), long_text, line()])
    processor = NVLMProcessor.from_config(TINY)
    small = SampleStream(parse_data_spec(str(path)), processor, seed=0, max_len=300)
    next(small), next(small)
    assert small.skips.counts == {"line too long": 1}
    # A row of 32k tokens allows lines of 2 MiB: the same line is read, then dropped as too long
    # (its 1.5M tokens do not fit) -- the line bound scales with the row.
    large = SampleStream(parse_data_spec(str(path)), processor, seed=0, max_len=32_768)
    next(large), next(large)
    assert large.skips.counts == {"longer than a row": 1}


def test_images_beyond_the_row_budget_are_not_decoded(tmp_path, count_decodes):
    big = flat_png(tmp_path / "big.png", (2000, 2000))      # 2x2 tiles + thumbnail = 5 tiles
    conversation = answer("<image>" * 20 + "\nAll the same?", "Yes.")
    processor = NVLMProcessor.from_config(TINY)
    # 20 images x 5 tiles x 16 tokens = 1600 image tokens > a 300-token row.
    with pytest.raises(SampleTooLong, match=r"at least \d+ tokens.*row of 300"):
        processor(conversation, [big] * 20, max_len=300)
    assert count_decodes == []
    # Through the data stream: the sample is counted as too long, nothing is decoded.
    path = write_lines(tmp_path / "data.jsonl", [
        json.dumps({"image": ["big.png"] * 20, "conversations": conversation}), line()])
    stream = SampleStream(parse_data_spec(str(path)), processor, seed=0, max_len=300)
    next(stream)
    assert stream.skips.counts == {"longer than a row": 1}
    assert count_decodes == []
    # The bound is a lower bound: a sample that fits is built, each image decoded once.
    sample = processor(answer(), [big], max_len=1000)
    assert sample.num_tiles == [5] and len(count_decodes) == 1


def test_budget_bound_never_drops_a_sample_that_fits():
    # EXIF may turn an image (width and height swap): the bound takes the cheaper orientation.
    processor = NVLMProcessor.from_config(TINY)
    tall = Image.new("RGB", (112, 560))                     # (1, 5): 6 tiles = 96 tokens
    sample = processor(answer(), [tall])
    assert processor(answer(), [tall], max_len=len(sample)).input_ids.equal(sample.input_ids)
    with pytest.raises(SampleTooLong, match=rf"{len(sample)} tokens.*row of {len(sample) - 1}"):
        processor(answer(), [tall], max_len=len(sample) - 1)


def test_load_image_streams_the_file(tmp_path):
    path = tmp_path / "padded.png"
    flat_png(path, (32, 32))
    with open(path, "ab") as f:                     # junk after IEND: never needed to decode
        f.write(b"\0" * 20_000_000)
    tracemalloc.start()
    try:
        image = load_image(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert image.size == (32, 32) and image.mode == "RGB"
    assert peak < 2_000_000, f"peak {peak} bytes: the file was read whole"


# --- 4. Every CLI flag is checked up front ------------------------------------------------------

def _flag_error(capsys, run, flag: str) -> None:
    assert run() == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err, err
    assert sum(line.startswith("error: ") or ": error: " in line for line in err.splitlines()) == 1


@pytest.mark.parametrize("argv,flag", [
    (["--tile-size", "0"], "--tile-size"),
    (["--tile-size", "-448"], "--tile-size"),
    (["--tile-size", "abc"], "--tile-size"),
    (["--max-tiles", "1.5"], "--max-tiles"),
    (["--thumbnail-tag", ""], "--thumbnail-tag"),
    (["--out", "{tmp}"], "--out"),                          # a folder, not a file
    (["--out", "{tmp}/missing/tiles.png"], "--out"),         # in a folder that does not exist
])
def test_cli_tiles_flags(tmp_path, capsys, argv, flag):
    image = flat_png(tmp_path / "photo.png", (64, 32))
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    _flag_error(capsys, lambda: cli_main(["tiles", str(image), *argv]), flag)


def test_cli_tiles_image_that_is_not_a_file(tmp_path, capsys):
    for path, says in ((tmp_path, "is a directory"), (Path(os.devnull), "not a regular file")):
        assert cli_main(["tiles", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and says in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("argv,flag", [
    (["--temperature", "nan"], "--temperature"),
    (["--temperature", "-0.5"], "--temperature"),
    (["--temperature", "inf"], "--temperature"),
    (["--top-p", "0"], "--top-p"),
    (["--top-p", "1.5"], "--top-p"),
    (["--top-p", "nan"], "--top-p"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**70)], "--seed"),
    (["--device", "bogus"], "--device"),
    (["--device", "meta"], "--device"),
    (["--model", "{tmp}/missing"], "--model"),
    (["--model", "{tmp}/photo.png"], "--model"),            # a file, not a checkpoint folder
    (["--image", "{tmp}/missing.png"], "--image"),
    (["--image", "{tmp}"], "--image"),
])
def test_cli_generate_flags(tmp_path, capsys, argv, flag):
    flat_png(tmp_path / "photo.png", (64, 32))
    base = {"--model": str(tmp_path), "--prompt": "hi", "--device": "cpu"}
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    base.update(zip(argv[::2], argv[1::2]))
    _flag_error(capsys, lambda: cli_main(["generate", *[x for kv in base.items() for x in kv]]),
                flag)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_generate_cuda_without_cuda(tmp_path, capsys):
    _flag_error(capsys, lambda: cli_main(["generate", "--model", str(tmp_path), "--prompt", "hi",
                                          "--device", "cuda"]), "--device")


@pytest.mark.parametrize("argv,flag", [
    (["--n", "0"], "--n"),
    (["--n", "-5"], "--n"),
    (["--eval-n", "0"], "--eval-n"),
    (["--digits", "2"], "--digits"),
    (["--digits", "9"], "--digits"),
    (["--seed", "-1"], "--seed"),
    (["--out", "{tmp}/a-file"], "--out"),                  # names a file, not a folder
])
def test_cli_synth_flags(tmp_path, capsys, argv, flag):
    (tmp_path / "a-file").write_text("not a folder")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    base = {"--out": str(tmp_path / "task"), "--n": "2", "--eval-n": "1"}
    base.update(zip(argv[::2], argv[1::2]))
    _flag_error(capsys, lambda: data_main(["synth", *[x for kv in base.items() for x in kv]]), flag)
    assert not (tmp_path / "task").exists()


def test_cli_synth_exit_status_and_a_good_run(tmp_path, capsys):
    bad = subprocess.run([sys.executable, "-m", "nvlm.data", "synth", "--out", str(tmp_path / "t"),
                          "--n", "0"], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert bad.returncode == 2 and "--n" in bad.stderr and "Traceback" not in bad.stderr
    assert data_main(["synth", "--out", str(tmp_path / "t"), "--n", "2", "--eval-n", "1"]) == 0
    assert len((tmp_path / "t" / "train.jsonl").read_text().splitlines()) == 2


# --- 8. Paths, file kinds, small bad files, JSON errors -----------------------------------------

def test_image_paths_may_not_leave_the_image_root(tmp_path):
    data, outside = tmp_path / "data", tmp_path / "outside"
    (data / "img").mkdir(parents=True)
    outside.mkdir()
    flat_png(data / "img" / "in.png", (40, 40))
    flat_png(outside / "out.png", (40, 40))
    lines = [line("img/in.png"), line("../outside/out.png"), line("img/../../outside/out.png"),
             line(str(outside / "out.png")), line(str(data / "img" / "in.png"))]
    path = write_lines(data / "data.jsonl", lines)

    def records(image_root):
        skips = SkipCounter()
        source = JsonlSource(path, image_root, skips)
        found = [source.next_record() for _ in range(2)]
        return found, skips

    # With --image-root every path must stay under it, absolute ones included.
    found, skips = records(data)
    assert [r.where.rsplit(":", 1)[1] for r in found] == ["1", "5"]
    assert skips.counts == {"bad line": 3}
    # Without one, paths are relative to the file's folder and may not climb out of it; an
    # absolute path is taken as written (documented in nvlm.data).
    found, skips = records(None)
    assert [r.where.rsplit(":", 1)[1] for r in found] == ["1", "4"]
    assert skips.counts == {"bad line": 2}


def test_image_root_escape_is_named(tmp_path, caplog):
    path = write_lines(tmp_path / "data.jsonl", [line("../x.png"), line()])
    source = JsonlSource(path, None, SkipCounter())
    source.next_record()
    assert f"{path}:1" in caplog.text and "outside the image root" in caplog.text


def test_files_that_are_not_regular_files_are_named_as_such(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a directory"):
        load_image(tmp_path)
    with pytest.raises(ValueError, match="is not a regular file"):     # an ImageError
        load_image(os.devnull)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="NUL byte"):
        load_image(str(tmp_path / "a\0b.png"))
    for spec, says in ((tmp_path, "is a directory"), (os.devnull, "not a regular file"),
                       (tmp_path / "nope.jsonl", "does not exist")):
        with pytest.raises(ValueError, match=f"--data: .*is not a file: .*{says}"):
            parse_data_spec(str(spec))
        with pytest.raises(ValueError, match=f"--eval-data: .*is not a file: .*{says}"):
            check_input_file(spec, "--eval-data")


def test_mostly_bad_guard_works_for_small_files(tmp_path):
    processor = NVLMProcessor.from_config(TINY)

    def three_samples(name, lines):          # past the end of the file: the check has run
        path = write_lines(tmp_path / name, lines)
        stream = SampleStream(parse_data_spec(str(path)), processor, seed=0, max_len=300)
        return [next(stream) for _ in range(3)]

    with pytest.raises(ValueError, match=r"all.jsonl: no usable sample.*3 bad"):
        three_samples("all.jsonl", ["{oops"] * 3)
    with pytest.raises(ValueError, match=r"most.jsonl: 4 of its 5 lines are bad"):
        three_samples("most.jsonl", [line()] + ["{oops"] * 4)
    # One bad line among good ones is skipped and counted, not an error; nor is half of them.
    assert len(three_samples("fine.jsonl", ["{oops"] + [line()] * 2)) == 3
    assert len(three_samples("half.jsonl", ["{oops", line()])) == 3


def test_resumed_source_does_not_judge_a_file_by_its_tail(tmp_path):
    # The last lines are bad; a source resumed just before them has seen no good line yet.
    path = write_lines(tmp_path / "data.jsonl", [line()] * 6 + ["{oops"] * 2)
    source = JsonlSource(path, None, SkipCounter())
    for _ in range(6):
        source.next_record()
    resumed = JsonlSource(path, None, SkipCounter())
    resumed.load_state_dict(source.state_dict())
    record = resumed.next_record()                # wraps into epoch 1 instead of failing
    assert resumed.epoch == 1 and record.where.endswith(":1")


def test_json_errors_name_the_file_and_line(tmp_path, caplog):
    deep = "[" * 100_000 + "]" * 100_000              # RecursionError inside json.loads
    path = write_lines(tmp_path / "data.jsonl", [line(), "{oops", deep, '"a string"', line()])
    skips = SkipCounter()
    source = JsonlSource(path, None, skips)
    source.next_record(), source.next_record()
    assert skips.counts == {"bad line": 3}
    for number in (2, 3, 4):
        assert f"{path}:{number}:" in caplog.text
    # A corrupt spec.json of the synthetic task names itself.
    folder = tmp_path / "task"
    folder.mkdir()
    (folder / "spec.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"spec\.json.*not valid JSON"):
        synth.ensure_task(folder, 2, 1)


def test_eval_set_skips_lines_without_a_question(tmp_path):
    no_user = json.dumps({"conversations": [{"from": "gpt", "value": "hi"}]})
    not_text = json.dumps({"conversations": [{"from": "human", "value": 3},
                                             {"from": "gpt", "value": "hi"}]})
    path = write_lines(tmp_path / "eval.jsonl", [no_user, not_text, line(), line()])
    items = load_eval_set(path, n=2)
    assert [(i.question, i.answer) for i in items] == [("Say hi.", "hi")] * 2
