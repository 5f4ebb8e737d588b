"""Render a GPU check's results file (benchmarks/gpu_check.py) as the README's tables.

    python benchmarks/report.py benchmarks/results/<card>-<date>.jsonl > table.md

Sections: the machine; each stage's outcome; correctness (worst error / tolerance per op, case,
dtype and backend, with FlashAttention-2's own error on the same inputs beside the attention
rows); speed (GPU time per call from CUDA-graph replay, TFLOP/s of useful work or GB/s of ideal
traffic, % of the measured ceiling, host time per call, and each kernel's speed-up over every
baseline of its group); the targets of the kernel issues, met or missed and by how much.
A truncated file (a run cut short) renders what it holds.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

KERNEL_PREFIXES = ("triton", "native", "fused")

# (op, mode, shapes or None for all, kernel impl, what, threshold): "what" is a baseline impl
# (speed-up >= threshold) or "%ceiling" (% of the measured ceiling >= threshold).
TARGETS = [
    ("varlen_attention", "forward+backward", None, "triton", "torch_varlen", 1.0),
    ("varlen_attention", "forward", ("vit-7x1024", "sft-d128"), "triton", "%ceiling", 50),
    ("cross_attention", "forward+backward", None, "triton", "eager_sdpa_mask", 2.0),
    ("cross_attention", "forward+backward", None, "triton", "flex", 1.2),
    ("pixel_shuffle", "forward", None, "triton", "%ceiling", 85),
    ("pixel_shuffle_layernorm", "forward", None, "triton", "%ceiling", 80),
    ("pixel_shuffle_layernorm", "forward", None, "triton", "eager", 1.8),
    ("pixel_shuffle_layernorm", "forward+backward", None, "triton", "eager", 1.5),
    ("multimodal_embed", "forward", None, "triton", "%ceiling", 80),
    ("multimodal_embed", "forward", None, "triton", "eager", 2.0),
]


def load(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass   # the last line of a killed run may be torn
    return rows


def is_kernel(impl: str) -> bool:
    return impl.startswith(KERNEL_PREFIXES)


def speed_rows(rows: list[dict]) -> list[dict]:
    """The timed rows with rate, % of ceiling and speed-ups filled in."""
    ceiling = next((r for r in rows if r["kind"] == "ceiling"), {})
    timed = [dict(r) for r in rows if r["kind"] == "time" and "gpu_ms" in r]
    for r in timed:
        seconds = r["gpu_ms"] / 1e3
        if r.get("flops"):
            r["tflops"] = r["flops"] / seconds / 1e12
            if ceiling.get("matmul_tflops"):
                r["pct_ceiling"] = 100 * r["tflops"] / ceiling["matmul_tflops"]
        elif r.get("bytes"):
            r["gbs"] = r["bytes"] / seconds / 1e9
            if ceiling.get("copy_gbs"):
                r["pct_ceiling"] = 100 * r["gbs"] / ceiling["copy_gbs"]
        elif r.get("tokens"):
            r["tokens_per_s"] = r["tokens"] / seconds
    groups = defaultdict(list)
    for r in timed:
        groups[(r["op"], r["mode"], r["shape"])].append(r)
    for members in groups.values():
        baselines = {r["impl"]: r["gpu_ms"] for r in members if not is_kernel(r["impl"])}
        for r in members:
            if is_kernel(r["impl"]):
                r["speedup"] = {name: ms / r["gpu_ms"] for name, ms in baselines.items()}
    return timed


def _rate(r: dict) -> str:
    if "tflops" in r:
        return f"{r['tflops']:.1f} TFLOP/s"
    if "gbs" in r:
        return f"{r['gbs']:.0f} GB/s"
    if "tokens_per_s" in r:
        return f"{r['tokens_per_s']:,.0f} tok/s"
    return "-"


def render(rows: list[dict]) -> str:
    env = next((r for r in rows if r["kind"] == "env"), {})
    plan = next((r for r in rows if r["kind"] == "plan"), {})
    ceiling = next((r for r in rows if r["kind"] == "ceiling"), {})
    out = [f"# GPU check: {env.get('gpu', 'no GPU (dry run)' if plan.get('dry_run') else '?')}, "
           f"{plan.get('date', '?')}", ""]
    out.append(f"torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}, "
               f"Python {env.get('python')}; nvidia-smi: {env.get('nvidia_smi', '-')}; "
               f"Python.h: {env.get('python_h')}; varlen_attn: "
               f"`{env.get('varlen_attn_signature', '-')}`")
    if ceiling:
        out.append(f"\nCeilings measured in the run: copy {ceiling['copy_gbs']:.0f} GB/s, "
                   f"{ceiling['matmul_dtype']} matmul {ceiling['matmul_tflops']:.1f} TFLOP/s.")

    out += ["", "## Stages", "", "| stage | status | seconds | note |", "|---|---|---|---|"]
    for r in rows:
        if r["kind"] == "stage":
            out.append(f"| {r['name']} | {r['status']} | {r.get('seconds', '-')} | "
                       f"{r.get('why', '')} |")
        elif r["kind"] == "background":
            out.append(f"| {r['job']} (background) | {r['status']} | {r.get('seconds', '-')} | "
                       f"{r.get('why', '')} |")

    out += ["", "## Correctness (worst error / tolerance; <= 1 passes)", "",
            "| op | case | dtype | backend | worst | ratio | FA2's error (same inputs) |",
            "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] != "correct":
            continue
        if "error" in r or "unavailable" in r:
            note = r.get("error") or f"unavailable: {r['unavailable']}"
            out.append(f"| {r['op']} | {r.get('case', '-')} | {r.get('dtype', '-')} | "
                       f"{r['backend']} | - | **{note[:160]}** | |")
            continue
        fa2 = r.get("fa2", "")
        if isinstance(fa2, dict):
            mine = {m["name"]: m["error"] for m in r["measurements"]}
            fa2 = ", ".join(f"{k} {v:.1e} (ours {mine.get(k, float('nan')):.1e})"
                            for k, v in fa2.items())
        verdict = f"{r['worst_ratio']:.2f}" + ("" if r["ok"] else " **FAIL**")
        out.append(f"| {r['op']} | {r['case']} | {r['dtype']} | {r['backend']} | {r['worst']} | "
                   f"{verdict} | {fa2} |")

    timed = speed_rows(rows)
    out += ["", "## Speed (GPU time per call; rate of useful work; % of the measured ceiling)", "",
            "| op | mode | shape | dtype | impl | GPU ms | method | rate | % ceil | host ms | speed-up |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in timed:
        pct = f"{r['pct_ceiling']:.0f}%" if "pct_ceiling" in r else "-"
        speedup = ", ".join(f"{v:.2f}x {k}" for k, v in r.get("speedup", {}).items()) or "-"
        out.append(f"| {r['op']} | {r['mode']} | {r['shape']} | {r.get('dtype', '-')} | "
                   f"{r['impl']} | {r['gpu_ms']:.3f} "
                   f"| {r['method']} | {_rate(r)} | {pct} | {r.get('host_ms', 0):.3f} | "
                   f"{speedup} |")
    for r in rows:
        if r["kind"] == "time" and "gpu_ms" not in r:
            out.append(f"| {r.get('op')} | {r.get('mode', '-')} | {r.get('shape')} | "
                       f"{r.get('dtype', '-')} | {r.get('impl')} | - | - | - | - | - | "
                       f"**{(r.get('error') or 'unavailable: ' + str(r.get('unavailable')))[:160]}** |")

    out += ["", "## Targets", ""] + [f"- {line}" for line in targets(timed)]
    tuned = next((r for r in rows if r["kind"] == "tuned"), None)
    if tuned:
        out += ["", "## Tuner picks", "", "```", json.dumps(tuned["configs"], indent=1), "```"]
    return "\n".join(out) + "\n"


def targets(timed: list[dict]) -> list[str]:
    lines = []
    for op, mode, shapes, impl, what, threshold in TARGETS:
        for r in timed:
            if (r["op"], r["mode"], r["impl"]) != (op, mode, impl):
                continue
            if shapes and r["shape"] not in shapes:
                continue
            if what == "%ceiling":
                value, goal = r.get("pct_ceiling"), f">= {threshold}% of the ceiling"
                shown = None if value is None else f"{value:.0f}%"
            else:
                value, goal = r.get("speedup", {}).get(what), f">= {threshold}x {what}"
                shown = None if value is None else f"{value:.2f}x"
            if value is None:
                lines.append(f"{op} {mode} {r['shape']} ({impl}): {goal}: not measured")
                continue
            verdict = "met" if value >= threshold else f"MISSED by {100 * (1 - value / threshold):.0f}%"
            lines.append(f"{op} {mode} {r['shape']} ({impl}): {goal}: {shown}, {verdict}")
    return lines or ["nothing measured"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="results.jsonl of a GPU check")
    args = parser.parse_args(argv)
    if not args.results.is_file():
        parser.error(f"results: {args.results} is not a file")
    sys.stdout.write(render(load(args.results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
