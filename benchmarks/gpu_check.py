"""The one-shot GPU check (docs/gpu.md): everything a rare, short GPU lease should measure, in
order of value, inside one hard deadline, every number on disk the moment it exists.

    bash benchmarks/gpu_prep.sh                        here: fetch what the GPU machine lacks
    bash benchmarks/gpu_check.sh [--deadline 420]      there (wraps this script)
    bash benchmarks/gpu_check.sh --dry-run             here: the same stages on the CPU, tiny shapes
    python benchmarks/report.py OUT/results.jsonl      the README table from the results

Stages run one after another, each in its own process (a kernel that faults poisons its CUDA
context; the next stage starts clean) with a time limit. Each stage may use what earlier stages
left unused, but never the budgets of the stages after it, so the whole run ends by the deadline
whatever hangs. Two jobs run in the background from the start: the CUDA extension's build (sm_90
only, half the cores) and a warm-up that compiles the FlexAttention baselines, so that the stages
that need them find them ready.

Files in OUT (5; the device returns at most 8): results.jsonl (one JSON row per measurement,
appended and fsynced as measured: a run cut at any point keeps everything before the cut),
run.log (every stage's output), build.log, flex.log, report.md (written last).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

BENCHMARKS = Path(__file__).resolve().parent
REPO_ROOT = BENCHMARKS.parent
RESULTS_FILE = "results.jsonl"
MAX_OUTPUT_FILES = 6          # the device returns 8; keep two spare
REPORT_RESERVE_S = 5          # kept back at the end for report.md


@dataclass(frozen=True)
class Stage:
    name: str
    budget_s: float
    waits_for: str | None = None   # a background job that must end first (its wait counts)


# In order of value (docs/gpu.md): bf16 correctness first, attention speed against FA2 next.
STAGES = (
    Stage("env", 15),
    Stage("correct", 65),           # every op, Triton, bf16 then fp16, small odd shapes
    Stage("correct_packs", 55),     # the real NVLM packs in bf16, FA2's error beside each
    Stage("speed_attention", 85),   # Triton vs FA2 (varlen_attn), SDPA loop/padded, masked SDPA
    Stage("speed_memory", 35),      # the card's ceilings, then the memory-bound ops vs eager
    Stage("native", 45, waits_for="build"),  # the CUDA extension: correctness, then timings
    Stage("flex", 40),              # FlexAttention baselines (compiled in the background)
    Stage("tune", 40),              # the tuner's picks and their times
    Stage("train_step", 25),        # the 1b model's SFT step, D/X/H, fused vs eager
)
DEADLINE_S = 420
BACKGROUND = ("build", "flex_warm")


def check_budgets(stages=STAGES, deadline_s: float = DEADLINE_S) -> None:
    total = sum(s.budget_s for s in stages) + REPORT_RESERVE_S
    if total > deadline_s:
        raise ValueError(f"stage budgets add up to {total:.0f} s (report reserve included), "
                         f"over the {deadline_s:.0f} s deadline")


# --------------------------------------------------------------------------------------------
# the results file


class Results:
    """Appends one JSON row per call to OUT/results.jsonl: written, flushed and fsynced before
    the call returns, so that a kill loses at most the row being measured."""

    def __init__(self, out: Path, stage: str):
        self.path, self.stage = Path(out) / RESULTS_FILE, stage
        self.t0 = float(os.environ.get("GPU_CHECK_T0", time.time()))

    def append(self, kind: str, **row) -> dict:
        row = {"stage": self.stage, "kind": kind, "t": round(time.time() - self.t0, 1), **row}
        line = json.dumps(row, default=str)
        with open(self.path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)   # parallel parts append to the same file
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        print(line, flush=True)
        return row


# --------------------------------------------------------------------------------------------
# the orchestrator (runs in the parent process; touches neither torch nor CUDA)


def _log_to(path: Path):
    log = open(path, "a", buffering=1)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()
        log.write(text)
    return write


def _kill(process: subprocess.Popen) -> None:
    """SIGTERM the process group (the stage and anything it started), SIGKILL after 3 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(3)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def run_command(command: list[str], timeout_s: float, write: Callable[[str], None],
                env: dict) -> tuple[str, int | None]:
    """Run `command`, relaying its output line by line; ("ok" | "failed" | "timeout", rc)."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=env, cwd=REPO_ROOT, start_new_session=True)
    relay = threading.Thread(target=lambda: [write(line) for line in process.stdout], daemon=True)
    relay.start()
    try:
        rc = process.wait(max(timeout_s, 0.1))
    except subprocess.TimeoutExpired:
        _kill(process)
        relay.join(2)
        return "timeout", None
    relay.join(2)
    return ("ok" if rc == 0 else "failed"), rc


def child_environment(dry_run: bool, t0: float) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", GPU_CHECK_T0=str(t0))
    paths = [str(REPO_ROOT), str(BENCHMARKS)] + [p for p in env.get("PYTHONPATH", "").split(":") if p]
    env["PYTHONPATH"] = ":".join(paths)
    if dry_run:
        env["TRITON_INTERPRET"] = "1"   # before triton is imported: the kernels on the CPU
    return env


def background_command(job: str, args) -> list[str] | None:
    if args.dry_run:
        return None   # the CPU install built the extension; FlexAttention is not compiled here
    if job == "build":
        # in place: the stages import nvlm_kernels from the checkout
        return [sys.executable, "setup.py", "build_ext", "--inplace"]
    return [sys.executable, "-u", __file__, "--stage", "flex", "--warm-only", "--out",
            str(args.out)]


def orchestrate(args, stages: tuple[Stage, ...] = STAGES) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    check_budgets(stages, args.deadline)
    t0 = time.time()
    env = child_environment(args.dry_run, t0)
    os.environ["GPU_CHECK_T0"] = str(t0)
    results = Results(out, "orchestrator")
    write = _log_to(out / "run.log")
    results.append("plan", date=datetime.datetime.now(datetime.timezone.utc).isoformat(
                       timespec="seconds"), deadline_s=args.deadline, dry_run=args.dry_run,
                   stages=[[s.name, s.budget_s] for s in stages])

    jobs: dict[str, tuple[subprocess.Popen, float, object]] = {}
    for job in BACKGROUND:
        command = background_command(job, args)
        if command is None:
            results.append("background", job=job, status="skipped", why="dry run")
            continue
        job_env = dict(env, NVLM_KERNELS_CUDA_ARCHS="90",
                       MAX_JOBS=str(max(1, (os.cpu_count() or 2) // 2)))
        log = open(out / f"{job.split('_')[0]}.log", "w")
        jobs[job] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=job_env,
                                      cwd=REPO_ROOT, start_new_session=True), time.time(), log)

    def finish_job(job: str, wait_s: float) -> str:
        process, started, log = jobs.pop(job)
        try:
            rc = process.wait(max(wait_s, 0.1))
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            _kill(process)
            rc, status = None, "timeout"
        log.close()
        tail = (out / f"{job.split('_')[0]}.log").read_text(errors="replace").splitlines()[-15:]
        results.append("background", job=job, status=status, returncode=rc,
                       seconds=round(time.time() - started, 1), log_tail=tail)
        return status

    failed = []
    for index, stage in enumerate(stages):
        later = sum(s.budget_s for s in stages[index + 1:])
        allowed = args.deadline - REPORT_RESERVE_S - (time.time() - t0) - later
        if allowed < min(stage.budget_s, 10):
            results.append("stage", name=stage.name, status="skipped", why="deadline")
            continue
        write(f"\n== {stage.name} (up to {allowed:.0f} s, t = {time.time() - t0:.0f} s)\n")
        start = time.time()
        if stage.waits_for in jobs:
            if finish_job(stage.waits_for, allowed - 10) != "ok":
                results.append("stage", name=stage.name, status="skipped",
                               why=f"{stage.waits_for} did not succeed (build.log)")
                continue
        if stage.name == "flex" and "flex_warm" in jobs:
            finish_job("flex_warm", 0)   # still compiling: it would compete with the timings
        command = [sys.executable, "-u", __file__, "--stage", stage.name, "--out", str(out)]
        command += ["--dry-run"] if args.dry_run else []
        status, rc = run_command(command, allowed - (time.time() - start), write, env)
        results.append("stage", name=stage.name, status=status, returncode=rc,
                       seconds=round(time.time() - start, 1))
        if status != "ok":
            failed.append(stage.name)
    for job in list(jobs):
        finish_job(job, 0)

    try:   # in this process: nothing left to import, nothing that can hang
        import report  # noqa: PLC0415  (benchmarks/report.py, beside this file)

        text, report_ok = report.render(report.load(out / RESULTS_FILE)), True
    except Exception as exc:  # noqa: BLE001  (the results file is the product; keep going)
        text, report_ok = f"report failed: {type(exc).__name__}: {exc}\n", False
    (out / "report.md").write_text(text)
    write(f"\n{text}\n")
    files = [p.name for p in out.iterdir()]
    write(f"== done in {time.time() - t0:.0f} s; files in {out}: {', '.join(sorted(files))}\n")
    if failed:
        write(f"== stages that did not finish cleanly: {', '.join(failed)}\n")
    return 1 if failed or not report_ok else 0


# --------------------------------------------------------------------------------------------
# the stages (each runs in its own process)


def _name(dtype) -> str:
    return str(dtype).replace("torch.", "")


class Context:
    def __init__(self, args, stage: str):
        import torch  # noqa: PLC0415

        self.dry_run, self.stage, self.out = args.dry_run, stage, args.out
        self.device = "cpu" if args.dry_run else "cuda"
        self.results = Results(args.out, stage)
        self.torch = torch
        if not self.dry_run and not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --dry-run on the CPU")
        # bf16 is the training dtype; the interpreter's bf16 tl.dot is wrong, so a dry run
        # checks the same paths in fp16
        self.dtype = torch.float16 if self.dry_run else torch.bfloat16

    def packs(self):
        from cases import TINY_VARLEN_PACKS, VARLEN_PACKS  # noqa: PLC0415

        return list((TINY_VARLEN_PACKS if self.dry_run else VARLEN_PACKS).values())

    def layouts(self):
        from cases import CROSS_LAYOUTS, TINY_CROSS_LAYOUTS  # noqa: PLC0415

        return list((TINY_CROSS_LAYOUTS if self.dry_run else CROSS_LAYOUTS).values())

    def memory_cases(self):
        from cases import memory_cases  # noqa: PLC0415

        return memory_cases("tiny" if self.dry_run else "real", self.device)

    def guarded(self, kind: str, **identity):
        """A context manager that records an exception of one measurement as an error row and
        lets the stage go on with the next one."""
        results = self.results

        @contextlib.contextmanager
        def guard():
            try:
                yield
            except Exception as exc:  # noqa: BLE001  (every failure is a finding to record)
                results.append(kind, **identity, error=f"{type(exc).__name__}: {exc}"[:500])
        return guard()


def stage_env(ctx: Context) -> None:
    torch = ctx.torch
    row = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "python_h": (Path(sysconfig.get_paths()["include"])
                                                    / "Python.h").exists()}
    with contextlib.suppress(ImportError):
        import triton  # noqa: PLC0415
        row["triton"] = triton.__version__
    if ctx.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        row.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                   sms=props.multi_processor_count, memory_gb=round(props.total_memory / 2**30, 1),
                   l2_mb=round(getattr(props, "L2_cache_size", 0) / 2**20, 1))
    if shutil.which("nvidia-smi"):
        query = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,"
                                "clocks.max.sm,power.limit", "--format=csv,noheader"],
                               capture_output=True, text=True)
        row["nvidia_smi"] = query.stdout.strip() or query.stderr.strip()
    from nvlm_kernels._toolchain import cutlass_include_dir, find_nvcc  # noqa: PLC0415

    nvcc = find_nvcc()
    row["nvcc"] = (subprocess.run([nvcc, "--version"], capture_output=True, text=True)
                   .stdout.strip().splitlines()[-1] if nvcc else None)
    row["cutlass_headers"] = cutlass_include_dir()
    try:
        import inspect  # noqa: PLC0415

        from torch.nn.attention.varlen import varlen_attn  # noqa: PLC0415
        row["varlen_attn_signature"] = str(inspect.signature(varlen_attn))
    except ImportError as exc:
        row["varlen_attn_signature"] = f"unavailable: {exc}"
    import importlib.util  # noqa: PLC0415

    row["flash_attn"] = importlib.util.find_spec("flash_attn") is not None
    ctx.results.append("env", **row)
    import nvlm_kernels as nk  # noqa: PLC0415

    for status in nk.available_backends().values():
        ctx.results.append("backend", name=status.name, available=status.available,
                           detail=str(status))


def _record_comparison(ctx: Context, comparison, case: str, **extra) -> None:
    worst = comparison.worst
    ctx.results.append(
        "correct", op=comparison.op, backend=comparison.backend,
        dtype=_name(comparison.dtype), case=case, ok=comparison.ok,
        worst=worst.name, worst_ratio=worst.error / worst.tolerance, problems=comparison.problems,
        measurements=[{"name": m.name, "error": m.error, "tolerance": m.tolerance,
                       "reference_error": m.reference_error} for m in comparison.measurements],
        **extra)


def _fa2_yardstick(ctx: Context, op: str, inputs: dict) -> dict:
    """FlashAttention-2's own errors (through torch's varlen_attn) on the same inputs."""
    if op != "varlen_attention" or ctx.device != "cuda":
        return {}
    from cases import Unavailable, torch_varlen_attention  # noqa: PLC0415
    from nvlm_kernels.testing import compare_with_reference  # noqa: PLC0415

    try:
        fa2 = compare_with_reference(op, inputs, "torch_varlen", function=torch_varlen_attention())
    except Unavailable as exc:
        return {"fa2": f"unavailable: {exc}"}
    except Exception as exc:  # noqa: BLE001
        return {"fa2": f"{type(exc).__name__}: {exc}"[:300]}
    return {"fa2": {m.name: m.error for m in fa2.measurements}}


def _small_cases(ctx: Context, op: str, dtype) -> list[tuple[str, dict]]:
    """Odd shapes: head dim 40, GQA 3, an empty sequence, lq != lk (nvlm_kernels.testing), plus
    GQA 7 and GQA 4 at the models' head dims, and the cross-attention layouts in miniature."""
    from cases import (TINY_CROSS_LAYOUTS, AttentionPack, cross_inputs,  # noqa: PLC0415
                       varlen_inputs)
    from nvlm_kernels.testing import sample_inputs  # noqa: PLC0415

    cases = [("odd", sample_inputs(op, ctx.device, dtype))]
    if op == "varlen_attention":
        extra = [AttentionPack("gqa7-d64", (65, 1, 130), 7, 1, 64, False),
                 AttentionPack("gqa4-d128-causal", (200, 3, 77), 8, 2, 128, True)]
        if ctx.dry_run:
            extra = [AttentionPack("gqa7-d32", (9, 1, 20), 7, 1, 32, False)]
        cases += [(p.name, varlen_inputs(p, ctx.device, dtype, seed=1)) for p in extra]
    if op == "cross_attention":
        cases += [(lay.name, cross_inputs(lay, ctx.device, dtype, seed=1))
                  for lay in TINY_CROSS_LAYOUTS.values()]
    return cases


def run_parts(ctx: Context, count: int) -> None:
    """Run parts 0..count-1 of this stage, each in its own process, several at a time: each part
    compiles its own Triton kernels (one core each; a cold compile takes seconds, and a stage
    needs dozens), and a kernel fault poisons only its own part's CUDA context. Parts are
    started in order, so the most valuable finish first. Only correctness and compile warm-ups
    run this way: concurrent processes would disturb timings."""
    from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

    workers = 2 if ctx.dry_run else max(1, min(8, (os.cpu_count() or 2) // 2))
    env = dict(os.environ)

    def run(part: int) -> None:
        command = [sys.executable, "-u", __file__, "--stage", ctx.stage, "--part", str(part),
                   "--out", str(ctx.out)] + (["--dry-run"] if ctx.dry_run else [])
        process = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO_ROOT)
        sys.stdout.write(process.stdout + process.stderr)
        sys.stdout.flush()
        if process.returncode != 0:
            tail = (process.stdout + process.stderr).strip().splitlines()[-3:]
            ctx.results.append("part", part=part, status="failed",
                               returncode=process.returncode, error=" | ".join(tail)[:500])

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(run, range(count)))


def correct_parts(ctx: Context) -> list[tuple]:
    """(dtype, op) in order of value: bf16 before fp16, attention before the memory-bound ops."""
    from nvlm_kernels._implementation import OPS  # noqa: PLC0415
    from nvlm_kernels.testing import ATTENTION_OPS  # noqa: PLC0415

    torch = ctx.torch
    dtypes = [torch.float16, torch.float32] if ctx.dry_run else [torch.bfloat16, torch.float16]
    memory_ops = [op for op in OPS if op not in ATTENTION_OPS]
    return ([(dtype, op) for dtype in dtypes for op in ATTENTION_OPS]
            + [(dtype, op) for dtype in dtypes for op in memory_ops])


def stage_correct(ctx: Context, part: int | None = None) -> None:
    parts = correct_parts(ctx)
    if part is None:
        return run_parts(ctx, len(parts))
    dtype, op = parts[part]
    for index, (case, inputs) in enumerate(_small_cases(ctx, op, dtype)):
        # the alternative tiles on the first (odd) case only: each is a new set of compiles
        _check_triton(ctx, op, case, dtype, lambda inputs=inputs: inputs, tiles=index == 0)


def _check_triton(ctx: Context, op: str, case: str, dtype, make: Callable[[], dict],
                  tiles: bool = False) -> None:
    """Correctness rows of the shipped Triton form and, for varlen attention, of its backward
    variants (never run on a card before: each is checked like the default); with `tiles`, of
    the attention tuner's alternative tiles too. FA2's error beside the default's. The inputs
    are made once, inside the guard (a failure there is a row too)."""
    from bench_utils import TILE_OPTIONS, TRITON_VARIANTS, triton_mode  # noqa: PLC0415
    from nvlm_kernels.testing import ATTENTION_OPS, compare_with_reference  # noqa: PLC0415

    labels = ["triton"] + (list(TRITON_VARIANTS) if op == "varlen_attention" else [])
    if tiles and op in ATTENTION_OPS:
        labels += list(TILE_OPTIONS)
    inputs = None
    for label in labels:
        with ctx.guarded("correct", op=op, backend=label, case=case, dtype=_name(dtype)), \
                triton_mode(label):
            inputs = inputs or make()
            comparison = compare_with_reference(op, inputs, "triton")
            comparison.backend = label
            fa2 = _fa2_yardstick(ctx, op, inputs) if label == "triton" else {}
            _record_comparison(ctx, comparison, case, **fa2)


def pack_cases(ctx: Context) -> list[tuple[str, str, Callable[[], dict]]]:
    """(op, case, make inputs) at the real NVLM sizes, attention first."""
    from cases import cross_inputs, varlen_inputs  # noqa: PLC0415

    dtype = ctx.dtype
    cases = [("varlen_attention", p.name, lambda p=p: varlen_inputs(p, ctx.device, dtype))
             for p in ctx.packs()]
    cases += [("cross_attention", lay.name, lambda lay=lay: cross_inputs(lay, ctx.device, dtype))
              for lay in ctx.layouts()]
    cases += [(c.op, c.shape, lambda c=c: c.kwargs(c.inputs(ctx.device, dtype, False)))
              for c in ctx.memory_cases()]
    return cases


def stage_correct_packs(ctx: Context, part: int | None = None) -> None:
    cases = pack_cases(ctx)
    if part is None:
        return run_parts(ctx, len(cases))
    op, case, make = cases[part]
    _check_triton(ctx, op, case, ctx.dtype, make)


# --- timing


def _input_sets(make: Callable[[int], dict], device: str, traffic: int = 2) -> list[dict]:
    """make(0), make(1), ...: enough input copies that one call on each passes through more
    memory than the cache holds (timing.rotation_count), counting `traffic` times the inputs'
    bytes per call (outputs and gradients come on top of the inputs)."""
    from timing import rotation_count  # noqa: PLC0415

    first = make(0)
    copies = rotation_count(traffic * _tensor_bytes(first), device)
    return [first] + [make(seed) for seed in range(1, copies)]


def _tensor_bytes(inputs: dict) -> int:
    import torch  # noqa: PLC0415

    return sum(t.numel() * t.element_size() for t in inputs.values() if isinstance(t, torch.Tensor))


def _time_row(ctx: Context, fn: Callable, sets: list[dict], *, mode: str, grad_names=(),
              warm_only: bool = False, **identity) -> None:
    """Time fn(**inputs) (forward) or the gradients of grad_names through it, and append a row;
    with warm_only, one untimed call (compiles and tuning) and no row."""
    from timing import time_call  # noqa: PLC0415

    torch = ctx.torch
    if mode == "forward":
        def call(inputs):
            return fn(**inputs)
        arguments = [(inputs,) for inputs in sets]
    else:
        grad = torch.randn_like(fn(**sets[0]))   # one output gradient for every input set

        def call(inputs, grad):
            tensors = [inputs[name] for name in grad_names]
            return torch.autograd.grad(fn(**inputs), tensors, grad)
        arguments = [(inputs, grad) for inputs in sets]
    if warm_only:
        call(*arguments[0])
        return
    timing = time_call(call, arguments, ctx.device, target_seconds=0.1 if ctx.dry_run else 0.3)
    ctx.results.append("time", mode=mode, dtype=_name(ctx.dtype),
                       device=ctx.device, **identity, **timing.as_row())


def _varlen_rows(ctx: Context, impls: list[str], modes=("forward", "forward+backward"),
                 only: str | None = None, warm_only: bool = False) -> None:
    from bench_utils import TRITON_VARIANTS  # noqa: PLC0415
    from cases import Unavailable, varlen_baseline, varlen_inputs  # noqa: PLC0415
    import nvlm_kernels as nk  # noqa: PLC0415

    for pack in ctx.packs():
        if only not in (None, pack.name):
            continue
        for mode in modes:
            grad = mode != "forward"
            sets = None
            for impl in impls:
                if impl in TRITON_VARIANTS and not grad:
                    continue   # backward variants
                if impl.endswith("split_group") and pack.groups == 1:
                    continue   # without GQA, the same programs as without the split
                identity = dict(op="varlen_attention", shape=pack.name, impl=impl,
                                flops=pack.useful_flops(mode))
                with ctx.guarded("time", mode=mode, **identity):
                    if sets is None:
                        sets = _input_sets(
                            lambda seed: varlen_inputs(pack, ctx.device, ctx.dtype, grad, seed),
                            ctx.device, 3 if grad else 2)
                    if impl.startswith("triton"):
                        fn = _on_triton(nk.varlen_attention, impl)
                    else:
                        try:
                            fn = varlen_baseline(impl, pack, ctx.device)
                        except Unavailable as exc:
                            ctx.results.append("time", mode=mode, **identity, unavailable=str(exc))
                            continue
                    _time_row(ctx, fn, sets, mode=mode, grad_names=("q", "k", "v"),
                              warm_only=warm_only, **identity)
            del sets
            if ctx.device == "cuda":
                ctx.torch.cuda.empty_cache()


def _on_triton(op: Callable, impl: str) -> Callable:
    """op(**inputs) on the Triton backend, in the settings of the row `impl` (triton_mode)."""
    from bench_utils import triton_mode  # noqa: PLC0415
    import nvlm_kernels as nk  # noqa: PLC0415

    def run(**inputs):
        with triton_mode(impl), nk.use_backend("triton"):
            return op(**inputs)
    return run


def _cross_rows(ctx: Context, impls: list[str], modes=("forward", "forward+backward"),
                only: str | None = None, warm_only: bool = False) -> None:
    from cases import cross_baseline, cross_flops, cross_inputs  # noqa: PLC0415
    import nvlm_kernels as nk  # noqa: PLC0415

    for layout in ctx.layouts():
        if only not in (None, layout.name):
            continue
        for mode in modes:
            grad = mode != "forward"
            sets = _input_sets(lambda seed: cross_inputs(layout, ctx.device, ctx.dtype, grad, seed),
                               ctx.device, 3 if grad else 2)
            for impl in impls:
                identity = dict(op="cross_attention", shape=layout.name, impl=impl,
                                flops=cross_flops(sets[0], mode))
                with ctx.guarded("time", mode=mode, **identity):
                    if impl.startswith("triton"):
                        fn = _on_triton(nk.cross_attention, impl)
                    else:
                        fn = cross_baseline(impl, layout, sets[0]["kv_start"], sets[0]["kv_end"])
                    _time_row(ctx, fn, sets, mode=mode, grad_names=("q", "k", "v", "gate"),
                              warm_only=warm_only, **identity)


def stage_speed_attention(ctx: Context) -> None:
    from bench_utils import TRITON_VARIANTS  # noqa: PLC0415
    from cases import VARLEN_BASELINES  # noqa: PLC0415

    # FA2 right after the kernel (the comparison that matters most); Flex has its own stage
    others = [b for b in VARLEN_BASELINES if b not in ("torch_varlen", "flex")]
    _varlen_rows(ctx, ["triton", "torch_varlen", *TRITON_VARIANTS, *others])
    _cross_rows(ctx, ["triton", "eager_sdpa_mask"])


def _memory_rows(ctx: Context, impls: list[str]) -> None:
    import nvlm_kernels as nk  # noqa: PLC0415

    for case in ctx.memory_cases():
        nbytes = case.bytes(ctx.dtype)
        for mode in ("forward", "forward+backward"):
            grad = mode != "forward"
            named = _input_sets(
                lambda _: dict(zip(case.arg_names, case.inputs(ctx.device, ctx.dtype, grad))),
                ctx.device, traffic=1)
            grad_names = [case.arg_names[i] for i in case.grad_inputs]
            for impl in impls:
                identity = dict(op=case.op, shape=case.shape, impl=impl, bytes=nbytes[mode])
                with ctx.guarded("time", mode=mode, **identity):
                    if impl == "eager":
                        def fn(**inputs):
                            return case.eager(*inputs.values())
                    else:
                        def fn(impl=impl, **inputs):
                            with nk.use_backend(impl):
                                return case.kernel(*inputs.values())
                    _time_row(ctx, fn, named, mode=mode, grad_names=grad_names, **identity)
            del named
            if ctx.device == "cuda":
                ctx.torch.cuda.empty_cache()


def stage_speed_memory(ctx: Context) -> None:
    from ceilings import measure  # noqa: PLC0415

    ctx.results.append("ceiling", **measure(ctx.device))
    _memory_rows(ctx, ["eager", "triton"])


def stage_native(ctx: Context) -> None:
    from nvlm_kernels._implementation import OPS  # noqa: PLC0415
    from nvlm_kernels.testing import (backend_unavailable_reason,  # noqa: PLC0415
                                      compare_with_reference)

    torch = ctx.torch
    for op in OPS:
        for dtype in dict.fromkeys((ctx.dtype, torch.float16, torch.float32)):
            reason = backend_unavailable_reason("native", op, ctx.device, dtype)
            if reason:
                ctx.results.append("correct", op=op, backend="native", dtype=_name(dtype),
                                   unavailable=reason)
                continue
            for case, inputs in _small_cases(ctx, op, dtype)[:1]:
                with ctx.guarded("correct", op=op, backend="native", case=case,
                                 dtype=_name(dtype)):
                    _record_comparison(ctx, compare_with_reference(op, inputs, "native"), case)
    for case in ctx.memory_cases():
        if backend_unavailable_reason("native", case.op, ctx.device, ctx.dtype) is None:
            with ctx.guarded("correct", op=case.op, backend="native", case=case.shape,
                             dtype=_name(ctx.dtype)):
                inputs = case.kwargs(case.inputs(ctx.device, ctx.dtype, False))
                _record_comparison(ctx, compare_with_reference(case.op, inputs, "native"),
                                   case.shape)
    _memory_rows(ctx, ["native"])


def stage_flex(ctx: Context, warm_only: bool = False) -> None:
    """FlexAttention rows; with warm_only, only the compiles (the background job: inductor's
    on-disk caches then serve the timed stage)."""
    from cases import cross_baseline, cross_inputs, varlen_baseline, varlen_inputs  # noqa: PLC0415

    if warm_only:
        torch = ctx.torch
        for pack in ctx.packs():
            inputs = varlen_inputs(pack, ctx.device, ctx.dtype, True)
            out = varlen_baseline("flex", pack, ctx.device)(**inputs)
            torch.autograd.grad(out, (inputs["q"], inputs["k"], inputs["v"]), out)
            print(f"flex compiled for {pack.name}", flush=True)
        for layout in ctx.layouts():
            inputs = cross_inputs(layout, ctx.device, ctx.dtype, True)
            fn = cross_baseline("flex", layout, inputs["kv_start"], inputs["kv_end"])
            out = fn(**inputs)
            torch.autograd.grad(out, (inputs["q"], inputs["k"], inputs["v"]), out)
            print(f"flex compiled for {layout.name}", flush=True)
        return
    _varlen_rows(ctx, ["flex"], modes=("forward+backward", "forward"))
    _cross_rows(ctx, ["flex"], modes=("forward+backward", "forward"))


def stage_tune(ctx: Context, part: int | None = None) -> None:
    """The tuner's picks for every pack and layout, and their times. First, in parallel parts,
    one tuned call per pack and mode: the candidates' compiles land in Triton's cache (the picks
    of these concurrent runs are thrown away); then, alone on the GPU, tuning and timing."""
    import nvlm_kernels as nk  # noqa: PLC0415

    shapes = [("varlen", p.name) for p in ctx.packs()] + [("cross", lay.name)
                                                          for lay in ctx.layouts()]
    if part is None:
        run_parts(ctx, len(shapes))
        _varlen_rows(ctx, ["triton_tuned"])
        _cross_rows(ctx, ["triton_tuned"])
        ctx.results.append("tuned", configs=nk.tuned_configs())
        return
    kind, name = shapes[part]
    with ctx.guarded("warm", op=kind, shape=name):
        with nk.autotuning():
            if kind == "varlen":
                _varlen_rows(ctx, ["triton_tuned"], only=name, warm_only=True)
            else:
                _cross_rows(ctx, ["triton_tuned"], only=name, warm_only=True)


def stage_train_step(ctx: Context) -> None:
    """One SFT step (forward, backward, AdamW) of the 1b preset (tiny in a dry run), D/X/H, with
    the fused kernels (backend auto) and on the eager torch backend."""
    import test_bench_train_step as train_bench  # noqa: PLC0415
    import nvlm_kernels as nk  # noqa: PLC0415
    from nvlm import recipes  # noqa: PLC0415
    from nvlm.config import NVLMConfig  # noqa: PLC0415
    from nvlm.model import NVLM  # noqa: PLC0415
    from nvlm.recipes import build_optimizer  # noqa: PLC0415
    from timing import time_call  # noqa: PLC0415

    torch, device = ctx.torch, ctx.device
    preset = train_bench.preset(device)
    for arch in ("D", "X", "H"):
        for impl, backend in train_bench.IMPLS.items():
            identity = dict(op="train_step", mode="fwd+bwd+adamw", shape=f"{preset}-{arch}",
                            impl=impl)
            with ctx.guarded("time", **identity):
                config = NVLMConfig.from_preset(preset, arch=arch)
                torch.manual_seed(0)
                with torch.device(device):
                    model = NVLM(config)
                model.init_weights()
                recipe = recipes.recipe(arch, "sft", preset)
                recipes.apply_freeze(model, recipe.trained)
                optimizer = build_optimizer(model, recipe)
                batch, length = train_bench.packed_batch(config, device)
                autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")

                def step():
                    with nk.use_backend(backend), autocast:
                        out = model(**batch, max_seqlen=length, return_logits=False)
                    out.loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)

                # an optimizer step is not a pure function of its inputs: no graph capture
                timing = time_call(lambda: step(), [()], device, use_graph=False,
                                   target_seconds=0.2 if ctx.dry_run else 1.0)
                peak = (torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None)
                ctx.results.append("time", **identity, device=device,
                                   tokens=train_bench.SAMPLES * length, peak_memory_gb=peak,
                                   **timing.as_row())
                model = optimizer = None   # free the model before the next arch
                if device == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()


STAGE_FUNCTIONS = {
    "env": stage_env, "correct": stage_correct, "correct_packs": stage_correct_packs,
    "speed_attention": stage_speed_attention, "speed_memory": stage_speed_memory,
    "native": stage_native, "flex": stage_flex, "tune": stage_tune,
    "train_step": stage_train_step,
}
assert set(STAGE_FUNCTIONS) == {s.name for s in STAGES}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="the same stages on the CPU (Triton interpreter), tiny shapes")
    parser.add_argument("--out", type=Path,
                        default=Path(os.environ.get("OUT") or REPO_ROOT / "benchmarks" / "results"
                                     / "latest"),
                        help="results folder (default $OUT, else benchmarks/results/latest)")
    parser.add_argument("--deadline", type=float, default=DEADLINE_S,
                        help=f"seconds for the whole run (default {DEADLINE_S})")
    parser.add_argument("--stage", choices=sorted(STAGE_FUNCTIONS), help=argparse.SUPPRESS)
    parser.add_argument("--warm-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--part", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage is None:
        return orchestrate(args)
    ctx = Context(args, args.stage)
    if args.stage == "flex":
        stage_flex(ctx, warm_only=args.warm_only)
    elif args.part is not None:
        STAGE_FUNCTIONS[args.stage](ctx, part=args.part)
    else:
        STAGE_FUNCTIONS[args.stage](ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
