"""Turn a pytest-benchmark JSON (+ the measured ceilings) into the results table and JSON.

    python benchmarks/report.py --bench raw.json --ceilings ceilings.json --out-dir DIR
        [--extra key=value ...]

Per benchmark: median time, GB/s (bytes an ideal fused kernel moves / time) or TFLOP/s (useful
FLOPs / time), % of the measured ceiling, and speed-up vs the eager baseline of the same group.
Writes DIR/<card>.json (named after the card, with torch/triton versions and the date) and prints
the table last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
from pathlib import Path

import torch


def _versions() -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
            "python": platform.python_version()}


def build_rows(bench: dict, ceilings: dict) -> list[dict]:
    rows = []
    for b in bench["benchmarks"]:
        info = b.get("extra_info", {})
        rows.append({"group": b["group"], "op": info.get("op", b["name"]), "mode": info.get("mode"),
                     "impl": info.get("impl"), "device": info.get("device"),
                     "dtype": info.get("dtype"), "shape": info.get("shape"),
                     "median_ms": b["stats"]["median"] * 1e3, "bytes": info.get("bytes"),
                     "flops": info.get("flops"), "tokens": info.get("tokens"),
                     "peak_memory_gb": info.get("peak_memory_gb"),
                     "configs": info.get("configs")})
    eager = {r["group"]: r["median_ms"] for r in rows if r["impl"] == "eager"}
    for r in rows:
        seconds = r["median_ms"] / 1e3
        if r["bytes"]:
            r["gbs"] = r["bytes"] / seconds / 1e9
            r["pct_of_ceiling"] = 100 * r["gbs"] / ceilings["copy_gbs"]
        elif r["flops"]:
            r["tflops"] = r["flops"] / seconds / 1e12
            r["pct_of_ceiling"] = 100 * r["tflops"] / ceilings["matmul_tflops"]
        elif r["tokens"]:
            r["tokens_per_s"] = r["tokens"] / seconds
        if r["group"] in eager:
            r["speedup_vs_eager"] = eager[r["group"]] / r["median_ms"]
    return rows


def format_table(rows: list[dict], ceilings: dict) -> str:
    lines = [f"ceilings on {ceilings['device_name']}: copy {ceilings['copy_gbs']:.0f} GB/s, "
             f"{ceilings['matmul_dtype']} matmul {ceilings['matmul_tflops']:.1f} TFLOP/s",
             f"{'op':<26} {'mode':<17} {'impl':<15} {'shape':<14} {'dtype':<15} {'ms':>9} "
             f"{'rate':>14} {'% ceil':>7} {'vs eager':>9}"]
    for r in rows:
        rate = (f"{r['gbs']:.1f} GB/s" if "gbs" in r else
                f"{r['tflops']:.1f} TFLOP/s" if "tflops" in r else
                f"{r['tokens_per_s']:,.0f} tok/s" if "tokens_per_s" in r else "-")
        pct = f"{r['pct_of_ceiling']:.0f}%" if "pct_of_ceiling" in r else "-"
        speedup = f"{r['speedup_vs_eager']:.2f}x" if "speedup_vs_eager" in r else "-"
        lines.append(f"{r['op']:<26} {r['mode'] or '-':<17} {r['impl'] or '-':<15} "
                     f"{r['shape'] or '-':<14} {r['dtype'] or '-':<15} {r['median_ms']:>9.3f} "
                     f"{rate:>14} {pct:>7} {speedup:>9}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", required=True, nargs="+",
                        help="pytest-benchmark JSON files (one per benchmark step), merged")
    parser.add_argument("--ceilings", required=True)
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--extra", action="append", default=[], help="key=value to record")
    args = parser.parse_args()
    bench = {"benchmarks": [b for path in args.bench
                            for b in json.loads(Path(path).read_text())["benchmarks"]]}
    ceilings = json.loads(Path(args.ceilings).read_text())
    rows = build_rows(bench, ceilings)
    card = re.sub(r"[^A-Za-z0-9]+", "-", ceilings["device_name"]).strip("-").lower()
    result = {"card": ceilings["device_name"], "date": datetime.date.today().isoformat(),
              "versions": _versions(), "ceilings": ceilings, "rows": rows,
              **dict(item.split("=", 1) for item in args.extra)}
    out = Path(args.out_dir) / f"{card}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"results written to {out}\n")
    print(format_table(rows, ceilings))


if __name__ == "__main__":
    main()
