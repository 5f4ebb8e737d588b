"""Static GPU checks that need no GPU (docs/design.md, "Static GPU checks").

Triton: every shipped kernel x config x key specialization (its `KernelSpec`, built on demand by
nvlm_kernels/compile_specs, one module per op) is compiled ahead of time for sm_80 and sm_90; the
cubin's resource usage is read back with the cuobjdump bundled in the triton wheel. A kernel passes when it
compiles, spills nothing to local memory (or no more than its spec's measured, commented
allowance), fits the card's shared memory, and, where the spec says so, its dots use wgmma on sm_90.

CUDA C++: every csrc/**/*.cu file is compiled with `nvcc -Xptxas -v` for the same archs and the
ptxas report (registers, spills, shared memory) is parsed the same way.

Run it as `python -m nvlm_kernels.compile_gate` (add --self-test to include two probe kernels that
prove the toolchain works, --json for machine-readable output). It runs in its own process because
under TRITON_INTERPRET=1 `triton.jit` returns interpreter objects that cannot be compiled.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ._toolchain import cutlass_include_dir, find_nvcc
from .compile_specs.spec import ARCHS, KernelSpec

# Opt-in dynamic shared memory per block: A100 163 KB, H100/H200 227 KB.
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Report:
    name: str
    arch: int
    kind: str                   # "triton" or "cuda"
    registers: int | None = None
    spill_bytes: int | None = None
    shared_bytes: int | None = None
    uses_wgmma: bool | None = None
    dots: int | None = None            # tl.dot ops in the kernel (TTIR)
    non_wgmma_dots: int | None = None  # of them, left as mma.sync on sm_90 (TTGIR tt.dot)
    widest_access_bits: int | None = None  # widest global load/store in the PTX
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


_RESOURCE_LINE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def cuobjdump_path() -> str:
    import triton  # noqa: PLC0415

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def compile_triton(spec: KernelSpec, arch: int) -> Report:
    import triton  # noqa: PLC0415
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415
    from triton.compiler import ASTSource  # noqa: PLC0415

    report = Report(spec.name, arch, "triton")
    names = list(spec.signature)
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in spec.divisible_by_16}
    try:
        compiled = triton.compile(
            ASTSource(fn=spec.kernel, signature=spec.signature, constexprs=spec.constexprs,
                      attrs=attrs),
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": spec.num_warps, "num_stages": spec.num_stages,
                     **({"maxnreg": spec.maxnreg} if spec.maxnreg else {})})
    except Exception as exc:  # noqa: BLE001  (any compiler failure is the finding)
        report.problems.append(f"does not compile: {type(exc).__name__}: {exc}".splitlines()[0])
        return report
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        dump = subprocess.run([cuobjdump_path(), "--dump-resource-usage", cubin.name],
                              capture_output=True, text=True, check=True).stdout
    match = _RESOURCE_LINE.search(dump)
    if match is None:
        report.problems.append(f"cuobjdump printed no resource line: {dump!r}")
        return report
    report.registers = int(match.group(1))
    # Register spills land in the per-thread stack frame (STACK); LOCAL counts other local arrays.
    report.spill_bytes = int(match.group(2)) + int(match.group(4))
    # Triton allocates its shared memory dynamically: metadata.shared is what a launch requests.
    report.shared_bytes = max(int(compiled.metadata.shared), int(match.group(3)))
    report.uses_wgmma = "wgmma" in compiled.asm["ptx"]
    report.dots = len(_TT_DOT.findall(compiled.asm["ttir"]))
    # On sm_90, AccelerateMatmul rewrites each dot it can into ttng.warp_group_dot; a tt.dot
    # left in the TTGIR lowers to mma.sync (Ampere's instruction, about half the rate)
    report.non_wgmma_dots = len(_TT_DOT.findall(compiled.asm["ttgir"])) if arch >= 90 else None
    report.widest_access_bits = _widest_global_access(compiled.asm["ptx"])
    _judge(report, spec.allowed_spill_bytes, spec.expects_wgmma, spec.allowed_non_wgmma_dots)
    if spec.expects_16_byte_access and report.widest_access_bits < 128:
        report.problems.append(f"global accesses are {report.widest_access_bits}-bit, "
                               f"expected 128-bit vectors")
    return report


_TT_DOT = re.compile(r"\btt\.dot\b")
_PTX_GLOBAL_ACCESS = re.compile(r"(?:ld|st)\.global(?:\.\w+)*?(?:\.v(\d))?\.[bfsu](\d+)\b")


def _widest_global_access(ptx: str) -> int:
    widths = [int(lanes or 1) * int(bits) for lanes, bits in _PTX_GLOBAL_ACCESS.findall(ptx)]
    return max(widths, default=0)


def _judge(report: Report, allowed_spill_bytes: int, expects_wgmma: bool,
           allowed_non_wgmma_dots: int = 0) -> None:
    if report.spill_bytes is not None and report.spill_bytes > allowed_spill_bytes:
        report.problems.append(f"spills {report.spill_bytes} bytes to local memory "
                               f"(allowed {allowed_spill_bytes})")
    limit = SHARED_MEMORY_LIMIT[report.arch]
    if report.shared_bytes is not None and report.shared_bytes > limit:
        report.problems.append(f"needs {report.shared_bytes} bytes of shared memory, "
                               f"sm_{report.arch} has {limit}")
    if expects_wgmma and report.arch >= 90 and not report.uses_wgmma:
        report.problems.append("its dots do not use wgmma on sm_90")
    elif (expects_wgmma and report.arch >= 90 and report.non_wgmma_dots is not None
          and report.non_wgmma_dots > allowed_non_wgmma_dots):
        report.problems.append(f"{report.non_wgmma_dots} of its {report.dots} dots do not use "
                               f"wgmma on sm_90 (allowed {allowed_non_wgmma_dots})")


# --------------------------------------------------------------------------------------------
# CUDA C++ through nvcc

_PTXAS_FUNCTION = re.compile(r"Compiling entry function '(\S+)' for 'sm_(\d+)'")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USAGE = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def cuda_sources() -> list[Path]:
    return sorted((REPO_ROOT / "csrc").rglob("*.cu"))


def compile_cuda(source: Path, arch: int) -> list[Report]:
    """ptxas resource usage of every kernel in `source` for sm_<arch> (one Report per kernel)."""
    nvcc = find_nvcc()
    command = [nvcc, "-c", str(source), "-o", os.devnull, "-std=c++17", "-O3",
               f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v",
               "--expt-relaxed-constexpr", f"-I{REPO_ROOT / 'csrc'}"]
    cutlass = cutlass_include_dir()
    if cutlass:
        command.append(f"-I{cutlass}")
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        return [Report(source.name, arch, "cuda", problems=[
            "nvcc failed: " + (result.stderr.strip().splitlines() or ["(no output)"])[-1]])]
    reports: list[Report] = []
    for line in result.stderr.splitlines():
        if (m := _PTXAS_FUNCTION.search(line)):
            reports.append(Report(f"{source.name}:{m.group(1)}", int(m.group(2)), "cuda"))
        elif reports and (m := _PTXAS_SPILLS.search(line)):
            reports[-1].spill_bytes = int(m.group(1)) + int(m.group(2))
        elif reports and (m := _PTXAS_USAGE.search(line)):
            reports[-1].registers = int(m.group(1))
            reports[-1].shared_bytes = int(m.group(2) or 0)
    names = _demangle([r.name.split(":", 1)[1] for r in reports])
    for report, name in zip(reports, names):
        report.name = f"{source.name}:{name}"
        _judge(report, 0, expects_wgmma=False)
    if not reports:
        reports.append(Report(source.name, arch, "cuda", problems=["ptxas reported no kernel"]))
    return reports


def _demangle(symbols: list[str]) -> list[str]:
    """Readable kernel names (c++filt, without namespaces and parameter lists) where available."""
    cxxfilt = shutil.which("c++filt")
    if not symbols or cxxfilt is None:
        return symbols
    result = subprocess.run([cxxfilt], input="\n".join(symbols), capture_output=True, text=True)
    names = result.stdout.splitlines()
    if result.returncode != 0 or len(names) != len(symbols):
        return symbols
    short = [re.sub(r"nvlm::cuda::|\(anonymous namespace\)::|^void ", "", n) for n in names]
    return [re.sub(r"\(.*\)$", "", n) for n in short]


# --------------------------------------------------------------------------------------------
# what is checked


def shipped_specs() -> list[KernelSpec]:
    from .compile_specs import shipped_specs as build  # noqa: PLC0415  (imports triton)

    return build()


def probe_specs() -> list[KernelSpec]:
    """Tiny kernels that exercise the toolchain: a masked copy, a 64x64 fp16 dot, and two dots
    of which only the 64-row one can use wgmma."""
    import triton  # noqa: PLC0415
    import triton.language as tl  # noqa: PLC0415

    @triton.jit
    def _probe_copy_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        tl.store(y_ptr + offsets, tl.load(x_ptr + offsets, mask=mask), mask=mask)

    @triton.jit
    def _probe_dot_kernel(a_ptr, b_ptr, c_ptr, BLOCK: tl.constexpr):
        idx = tl.arange(0, BLOCK)
        tile = idx[:, None] * BLOCK + idx[None, :]
        tl.store(c_ptr + tile, tl.dot(tl.load(a_ptr + tile), tl.load(b_ptr + tile)))

    @triton.jit
    def _probe_narrow_dot_kernel(a_ptr, b_ptr, c_ptr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        rows, cols = tl.arange(0, ROWS), tl.arange(0, BLOCK)
        a = tl.load(a_ptr + rows[:, None] * BLOCK + cols[None, :])
        b = tl.load(b_ptr + cols[:, None] * BLOCK + cols[None, :])
        c = tl.dot(a, b)                                     # M = ROWS = 16: mma.sync
        wide = tl.dot(tl.trans(c.to(tl.float16)), a)        # M = BLOCK = 64: wgmma
        tl.store(c_ptr + cols[:, None] * BLOCK + cols[None, :], wide)

    return [
        # one dot of two stays mma.sync on sm_90: proves the gate counts per dot (not judged)
        KernelSpec("probe_narrow_dot", _probe_narrow_dot_kernel,
                   {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32", "ROWS": "constexpr",
                    "BLOCK": "constexpr"}, {"ROWS": 16, "BLOCK": 64}),
        KernelSpec("probe_copy", _probe_copy_kernel,
                   {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"},
                   {"BLOCK": 1024}),
        KernelSpec("probe_dot", _probe_dot_kernel,
                   {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32", "BLOCK": "constexpr"},
                   {"BLOCK": 64}, expects_wgmma=True),
    ]


def _specs(self_test: bool) -> list[KernelSpec]:
    return (probe_specs() if self_test else []) + shipped_specs()


def _compile_job(job: tuple[int, int, bool]) -> Report:
    """One (spec index, arch) compile in a worker process, which rebuilds the spec list itself:
    jit functions do not pickle, indices do."""
    index, arch, self_test = job
    return compile_triton(_specs(self_test)[index], arch)


def run(self_test: bool = False, include_cuda: bool = True,
        jobs: int | None = None) -> list[Report]:
    """Compile everything; the Triton specs in `jobs` processes (default: one per core), since
    each compile is single-threaded and a cold run of the ~250 compiles takes minutes."""
    specs = _specs(self_test)
    work = [(index, arch, self_test) for index, spec in enumerate(specs) for arch in spec.archs]
    jobs = jobs or len(os.sched_getaffinity(0))
    if jobs > 1:
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(jobs, mp_context=context) as pool:
            reports = list(pool.map(_compile_job, work, chunksize=2))
    else:
        reports = [compile_triton(specs[index], arch) for index, arch, _ in work]
    if include_cuda and find_nvcc():
        reports += [r for src in cuda_sources() for arch in ARCHS for r in compile_cuda(src, arch)]
    return reports


def format_table(reports: list[Report]) -> str:
    lines = [f"{'kernel':<48} {'arch':>5} {'regs':>5} {'spill':>6} {'smem':>8} {'wgmma':>6} "
             f"{'vec':>4}  verdict"]
    for r in reports:
        # wgmma column on sm_90: dots lowered to wgmma / all dots
        wgmma = ("-" if r.uses_wgmma is None or not r.dots else
                 f"{r.dots - r.non_wgmma_dots}/{r.dots}" if r.non_wgmma_dots is not None else
                 ("yes" if r.uses_wgmma else "no"))
        verdict = "ok" if r.ok else "FAIL: " + "; ".join(r.problems)
        lines.append(f"{r.name[:48]:<48} {'sm_' + str(r.arch):>5} {str(r.registers):>5} "
                     f"{str(r.spill_bytes):>6} {str(r.shared_bytes):>8} {wgmma:>6} "
                     f"{str(r.widest_access_bits or '-'):>4}  {verdict}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--self-test", action="store_true", help="also compile the probe kernels")
    parser.add_argument("--no-cuda", action="store_true", help="skip the nvcc checks of csrc/")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--jobs", type=int, default=None,
                        help="parallel Triton compiles (default: one per core)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    reports = run(self_test=args.self_test, include_cuda=not args.no_cuda, jobs=args.jobs)
    if args.json:
        print(json.dumps([asdict(r) | {"ok": r.ok} for r in reports], indent=1))
    else:
        print(format_table(reports))
        if not find_nvcc():
            print("nvcc not found: the CUDA sources were not compile-checked")
    return 0 if all(r.ok for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
