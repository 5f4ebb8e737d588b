"""Runs the demo (`python nvlm/train.py`) several times and prints one markdown table of results.

    .venv/bin/python scripts/demo_table.py                      # seeds 0-4 of the default demo
    .venv/bin/python scripts/demo_table.py --seeds 0-9 --jobs 2
    .venv/bin/python scripts/demo_table.py --ablations          # docs/results.md's ablation table

Each run is its own process, single-threaded (OMP_NUM_THREADS=1), `--jobs` at a time (2 on a
2-core machine), with its folder, log and summary.json under --out. A run whose summary.json is
already there is not run again, so a table can be extended or re-printed. `--ablations` runs the
paper's comparisons in miniature (docs/results.md), two seeds per row.

The table gives, per run: exact match on the 200 held-out images and on the same prompts with
blank images, the vision warm-up's glyph accuracy, the text warm-up's final loss, the SFT loss
first -> final, the SFT stage's samples per second, and the run's wall time (one thread each; a
lone run on two threads is faster). Below it: the date, the machine, the commit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nvlm.plot import plot_series  # noqa: E402


@dataclass(frozen=True)
class Row:
    name: str                      # what the row varies (the table's first column)
    flags: tuple[str, ...] = ()    # extra train.py flags


# The paper's findings at tiny scale (docs/results.md): one change per row,
# everything else the default demo.
ABLATIONS = (
    Row("NVLM-D, tiles + 1-D tags (the demo)"),
    Row("NVLM-D, thumbnail only (no tiling)", ("--max-tiles", "1")),
    Row("NVLM-D, tiles without tags", ("--no-tile-tags",)),
    Row("NVLM-X, tiles + tags", ("--arch", "X")),
    Row("NVLM-H, tiles + tags", ("--arch", "H")),
)


def parse_seeds(text: str) -> list[int]:
    """'0-4' or '0,3,7' (or a mix: '0-2,9')."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            seeds += list(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seeds like 0-4 or 0,3,7, got {text!r}") from None
    if not seeds or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative seeds, got {text!r}")
    return seeds


def run_folder(out: Path, row_index: int, seed: int, ablations: bool) -> Path:
    return out / (f"row{row_index}-seed{seed}" if ablations else f"seed{seed}")


def sft_samples_per_s(folder: Path) -> float | None:
    """Training throughput of the SFT stage (samples, not tokens: NVLM-X puts fewer tokens in
    the decoder for the same sample), from the run's metrics."""
    samples = seconds = 0.0
    with open(folder / "metrics.jsonl") as f:
        for line in f:
            row = json.loads(line)
            if row["stage"] == "sft" and "samples" in row:
                samples += row["samples"]
                seconds += row["tokens"] / row["tokens_per_s"]
    return samples / seconds if seconds else None


def read_summary(folder: Path) -> dict:
    summary = json.loads((folder / "summary.json").read_text())
    summary["sft_samples_per_s"] = sft_samples_per_s(folder)
    return summary


def run_one(folder: Path, row: Row, seed: int) -> dict:
    """train.py in its own single-threaded process; its summary (or the error it ended with)."""
    summary_path = folder / "summary.json"
    if summary_path.is_file():
        return read_summary(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    command = [sys.executable, str(ROOT / "nvlm" / "train.py"), "--seed", str(seed),
               "--out", str(folder), *row.flags]
    if (folder / "checkpoints" / "latest").is_file():   # a run killed earlier: continue it
        command.append("--resume")
    elif folder.exists():   # killed before its first checkpoint: start it over
        shutil.rmtree(folder)
    start = time.perf_counter()
    with open(folder.parent / f"{folder.name}.log", "w") as log:
        done = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    if done.returncode != 0 or not summary_path.is_file():
        return {"error": f"exit {done.returncode} after {time.perf_counter() - start:.0f} s "
                         f"(see {folder.parent / (folder.name + '.log')})"}
    return read_summary(folder)


def sft_curve(folder: Path, every: int = 25) -> list[tuple[float, float]]:
    """The SFT stage's loss, averaged over every `every` steps (one step's loss is noisy)."""
    with open(folder / "metrics.jsonl") as f:
        rows = [r for r in map(json.loads, f) if r["stage"] == "sft"]
    first = rows[0]["step"] - 1 if rows else 0
    return [(rows[i]["step"] - first, sum(r["loss"] for r in rows[i:i + every])
             / len(rows[i:i + every])) for i in range(0, len(rows), every)]


def _minutes(seconds: float | None) -> str:
    return "" if seconds is None else f"{int(seconds // 60)} m {int(seconds % 60):02d} s"


def _number(value: float | None, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def table(results: list[tuple[Row, int, dict]], show_rows: bool) -> str:
    head = ["run"] if show_rows else []
    head += ["seed", "exact match", "blank images", "glyph accuracy", "text warm-up loss",
             "SFT loss first → final", "SFT samples/s", "wall (1 thread)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, seed, s in results:
        cells = [row.name] if show_rows else []
        if "error" in s:
            cells += [str(seed), s["error"], "", "", "", "", "", ""]
        else:
            losses = s.get("stage_losses", {})
            text, sft = losses.get("text", {}), losses.get("sft", {})
            cells += [str(seed), _number(s["eval_exact_match"]),
                      _number(s["eval_exact_match_blank"]),
                      _number(s.get("vision_glyph_accuracy"), 2),
                      _number(text.get("final"), 3),
                      f"{_number(sft.get('first'), 2)} → {_number(sft.get('final'), 3)}",
                      _number(s.get("sft_samples_per_s"), 1), _minutes(s.get("wall_s"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def provenance() -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                            capture_output=True).stdout.strip() or "unknown"
    cpu = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                     if line.startswith("model name"))
        cpu = model
    except (OSError, StopIteration):
        pass
    return (f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores ({cpu}), commit {commit}, "
            f"`{' '.join(['python', 'scripts/demo_table.py', *sys.argv[1:]])}`")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=parse_seeds, default=None,
                        help="seeds to run, e.g. 0-4 or 0,3,7 (default 0-4; 0-1 with --ablations)")
    parser.add_argument("--ablations", action="store_true",
                        help="the paper's comparisons in miniature, one row per change")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder of the runs (default runs/demo-seeds or runs/ablations)")
    parser.add_argument("--plot", type=Path, default=None,
                        help="also draw every run's SFT loss into this PNG (default: OUT/sft-loss.png)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs: expected >= 1, got {args.jobs}")
    seeds = args.seeds or ([0, 1] if args.ablations else [0, 1, 2, 3, 4])
    rows = ABLATIONS if args.ablations else (Row("the demo"),)
    out = args.out or ROOT / "runs" / ("ablations" if args.ablations else "demo-seeds")
    jobs = [(i, row, seed) for i, row in enumerate(rows) for seed in seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        summaries = list(pool.map(
            lambda job: run_one(run_folder(out, job[0], job[2], args.ablations), job[1], job[2]),
            jobs))
    results = [(row, seed, s) for (_, row, seed), s in zip(jobs, summaries)]
    print(table(results, show_rows=args.ablations))
    curves = [(f"{row.name}, seed {seed}" if args.ablations else f"seed {seed}",
               sft_curve(run_folder(out, i, seed, args.ablations)))
              for (i, row, seed), s in zip(jobs, summaries) if "error" not in s]
    plot = args.plot or out / "sft-loss.png"
    plot_series(curves, plot, "SFT loss (mean of 25 steps)")
    print(f"\nSFT loss curves: {plot}")
    print(f"\n{provenance()}")
    return 0 if all("error" not in s for _, _, s in results) else 1


if __name__ == "__main__":
    sys.exit(main())
