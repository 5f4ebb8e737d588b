"""The one-shot GPU check (benchmarks/gpu_check.py) is tried here before any GPU minute is spent:
its budgets fit the deadline, a stage killed at its limit keeps the rows it wrote, the FA2
baseline adapts to varlen_attn's signature, the report renders a torn file, and the whole check
runs end to end on the CPU (dry run: the Triton interpreter, tiny shapes, the same stages and
files)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import cases  # noqa: E402
import gpu_check  # noqa: E402
import report  # noqa: E402


def test_stage_budgets_fit_the_deadline():
    assert gpu_check.DEADLINE_S <= 420   # the device allows 600 s a command; leave a rerun's room
    gpu_check.check_budgets()
    too_long = gpu_check.STAGES + (gpu_check.Stage("extra", gpu_check.DEADLINE_S),)
    with pytest.raises(ValueError, match="over the"):
        gpu_check.check_budgets(too_long)
    assert set(gpu_check.STAGE_FUNCTIONS) == {s.name for s in gpu_check.STAGES}


def test_a_stage_killed_at_its_limit_keeps_every_row_it_wrote(tmp_path):
    child = ("import sys, time; sys.path.insert(0, sys.argv[1]); import gpu_check; "
             "r = gpu_check.Results(sys.argv[2], 'probe'); r.append('time', n=1); "
             "r.append('time', n=2); time.sleep(60); r.append('time', n=3)")
    lines = []
    start = time.time()
    status, rc = gpu_check.run_command([sys.executable, "-c", child, str(BENCHMARKS),
                                        str(tmp_path)], 8, lines.append, env=None)
    assert status == "timeout" and rc is None
    assert time.time() - start < 20
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["n"] for r in rows] == [1, 2]
    assert all(r["stage"] == "probe" and r["kind"] == "time" for r in rows)
    assert len(lines) == 2   # the child's output was relayed line by line before the kill


@pytest.mark.parametrize("style", ["is_causal", "window_size", "window_size+gqa"])
def test_fa2_baseline_follows_the_varlen_attn_signature(monkeypatch, style):
    """torch < 2.11 took is_causal=; pytorch#172245 made causal window_size=(-1, 0); enable_gqa
    came in 2.12 (before it K and V are repeated per query head)."""
    import torch.nn.attention.varlen as varlen_module

    seen = {}
    if style == "is_causal":
        def fake(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None,
                 is_causal=False):
            seen.update(is_causal=is_causal, heads_k=key.shape[1])
            return query
    elif style == "window_size":
        def fake(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None,
                 window_size=(-1, -1)):
            seen.update(window_size=window_size, heads_k=key.shape[1])
            return query
    else:
        def fake(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None,
                 window_size=(-1, -1), enable_gqa=False):
            seen.update(window_size=window_size, heads_k=key.shape[1], enable_gqa=enable_gqa)
            return query
    monkeypatch.setattr(varlen_module, "varlen_attn", fake)
    pack = cases.AttentionPack("p", (5, 3), 6, 2, 32, True)
    cases.torch_varlen_attention()(**cases.varlen_inputs(pack, "cpu", torch.float32))
    if style == "is_causal":
        assert seen == {"is_causal": True, "heads_k": 6}
    elif style == "window_size":
        assert seen == {"window_size": (-1, 0), "heads_k": 6}
    else:
        assert seen == {"window_size": (-1, 0), "heads_k": 2, "enable_gqa": True}


def test_report_renders_speed_ups_targets_and_a_torn_last_line(tmp_path):
    rows = [
        {"kind": "plan", "date": "2026-11-28", "dry_run": False},
        {"kind": "ceiling", "copy_gbs": 4000.0, "matmul_tflops": 800.0, "matmul_dtype": "bf16"},
        {"kind": "time", "op": "pixel_shuffle", "mode": "forward", "shape": "s", "impl": "eager",
         "dtype": "bf16",
         "gpu_ms": 0.06, "method": "graph", "bytes": 200_000_000, "host_ms": 0.02},
        {"kind": "time", "op": "pixel_shuffle", "mode": "forward", "shape": "s", "impl": "triton",
         "dtype": "bf16",
         "gpu_ms": 0.05, "method": "graph", "bytes": 200_000_000, "host_ms": 0.04},
    ]
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"kind": "time", "op"')
    text = report.render(report.load(path))
    assert "| pixel_shuffle | forward | s | bf16 | triton | 0.050 | graph | 4000 GB/s | 100% |" in text
    assert "1.20x eager" in text
    assert "pixel_shuffle forward s (triton): >= 85% of the ceiling: 100%, met" in text


@pytest.mark.slow
def test_dry_run_runs_every_stage_on_the_cpu(tmp_path):
    result = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_check.py"), "--dry-run",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["report.md", "results.jsonl", "run.log"]
    assert len(files) <= gpu_check.MAX_OUTPUT_FILES
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    stages = {r["name"]: r["status"] for r in rows if r["kind"] == "stage"}
    assert stages == {s.name: "ok" for s in gpu_check.STAGES}
    assert not [r for r in rows if r["kind"] == "part"], "a parallel part failed"
    # every op checked on Triton against float64, every check passing
    correct = [r for r in rows if r["kind"] == "correct" and r["backend"].startswith("triton")]
    assert {r["op"] for r in correct} == {"varlen_attention", "cross_attention", "pixel_shuffle",
                                          "pixel_shuffle_layernorm", "multimodal_embed"}
    assert all(r.get("ok") for r in correct), [r for r in correct if not r.get("ok")]
    # varlen attention's backward variants are checked like the default
    assert {r["backend"] for r in correct if r["op"] == "varlen_attention"} == {
        "triton", "triton_kq", "triton_atomic_dq", "triton_split_group", "triton_kq_split_group",
        "triton_tiles1", "triton_tiles2"}
    # and both attention ops' alternative tiles, which the tuner may pick
    assert {r["backend"] for r in correct if r["op"] == "cross_attention"} == {
        "triton", "triton_tiles1", "triton_tiles2"}
    # every op timed on Triton, and beside a baseline
    timed = [r for r in rows if r["kind"] == "time" and "gpu_ms" in r]
    assert {r["op"] for r in timed if r["impl"] == "triton"} >= {
        "varlen_attention", "cross_attention", "pixel_shuffle", "pixel_shuffle_layernorm",
        "multimodal_embed"}
    assert {"sdpa_loop", "eager_sdpa_mask", "eager", "flex", "triton_kq",
            "triton_atomic_dq", "triton_split_group", "triton_kq_split_group"} <= {
                r["impl"] for r in timed}
    assert {r["shape"] for r in timed if r["op"] == "train_step"} == {"tiny-D", "tiny-X",
                                                                       "tiny-H"}
    # rows carry their time since the start, in the order they were written (serial stages)
    serial = [r["t"] for r in rows if r["stage"] in ("speed_attention", "speed_memory")]
    assert serial == sorted(serial) and serial
    assert "## Targets" in (tmp_path / "report.md").read_text()
