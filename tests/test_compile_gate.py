"""The compile gate (docs/design.md, "Static GPU checks"): every shipped Triton kernel compiles for
sm_80 and sm_90 without spills and within shared memory, and every csrc/**/*.cu compiles with
nvcc; probe kernels prove the toolchain reads back the real resource usage."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from nvlm_kernels import compile_gate
from nvlm_kernels.compile_gate import Report
from nvlm_kernels.compile_specs.spec import GQA_GROUPS, signature



@pytest.fixture(scope="module")
def triton_reports() -> list[dict]:
    """Runs the gate in a fresh process: under TRITON_INTERPRET=1 (set for this test session)
    triton.jit yields interpreter objects that cannot be compiled."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "nvlm_kernels.compile_gate", "--self-test",
                             "--no-cuda", "--json"], capture_output=True, text=True, env=env,
                            timeout=900)
    assert result.stdout.strip(), result.stderr
    return json.loads(result.stdout)


def test_every_triton_kernel_passes_the_gate(triton_reports):
    failures = [r for r in triton_reports if not r["ok"]]
    assert not failures, "\n".join(f"{r['name']} sm_{r['arch']}: {r['problems']}" for r in failures)


def test_every_shipped_spec_is_compiled_for_its_archs(triton_reports):
    """Each spec for the archs it ships on (sm_80 and sm_90 unless it is an arch-specific
    configuration), and every arch has kernels."""
    compiled = {(r["name"], r["arch"]) for r in triton_reports}
    specs = compile_gate.shipped_specs()
    for spec in specs:
        for arch in spec.archs:
            assert (spec.name, arch) in compiled, f"{spec.name} was not compiled for sm_{arch}"
    for arch in compile_gate.ARCHS:
        assert any(arch in spec.archs for spec in specs), f"no shipped kernel for sm_{arch}"
        for probe in ("probe_copy", "probe_dot", "probe_narrow_dot"):
            assert (probe, arch) in compiled


def test_probe_kernels_report_real_resource_usage(triton_reports):
    by_key = {(r["name"], r["arch"]): r for r in triton_reports}
    for arch in compile_gate.ARCHS:
        copy, dot = by_key[("probe_copy", arch)], by_key[("probe_dot", arch)]
        assert copy["registers"] > 0 and copy["spill_bytes"] == 0
        assert copy["shared_bytes"] == 0  # a copy needs no shared memory ...
        assert dot["shared_bytes"] > 0    # ... a 64x64 dot stages its operands there
    assert by_key[("probe_dot", 90)]["uses_wgmma"]
    assert not by_key[("probe_dot", 80)]["uses_wgmma"]
    # per dot, not "wgmma somewhere in the PTX": of the narrow probe's two dots, the 16-row one
    # stays mma.sync on sm_90
    assert (by_key[("probe_dot", 90)]["dots"], by_key[("probe_dot", 90)]["non_wgmma_dots"]) == (1, 0)
    narrow = by_key[("probe_narrow_dot", 90)]
    assert narrow["uses_wgmma"] and (narrow["dots"], narrow["non_wgmma_dots"]) == (2, 1)


def test_gqa_specializations_are_compiled(triton_reports):
    """The decoders launch GROUP > 1 (Qwen2-0.5B 7, NVLM-D-72B 8): each attention pass is
    compiled for the GQA group sizes on sm_90, with every dot on wgmma."""
    compiled = {r["name"]: r for r in triton_reports if r["arch"] == 90}
    for op in ("varlen_attention", "cross_attention"):
        for group in GQA_GROUPS:
            names = [n for n in compiled if n.startswith(op) and n.endswith(f",gqa{group}]")]
            kinds = {n.split("[")[0].rsplit("_", 1)[-1] for n in names}
            assert {"fwd", "dkdv", "dq"} <= kinds, (op, group, names)
            assert all(compiled[n]["ok"] and compiled[n]["non_wgmma_dots"] == 0 for n in names)


def test_signatures_are_read_from_the_kernel():
    """Argument names and order come from the kernel (the interpreter's function here, triton's
    JITFunction.params in the gate's process); a spec names only the exceptions to "tensor
    pointer or i32", and an exception that names no runtime parameter is refused."""
    triton = pytest.importorskip("triton")
    import triton.language as tl

    @triton.jit
    def kernel(x_ptr, lse_ptr, n, scale, BLOCK: tl.constexpr):
        pass

    assert list(signature(kernel, "bf16", lse_ptr="*fp32", scale="fp32").items()) == [
        ("x_ptr", "*bf16"), ("lse_ptr", "*fp32"), ("n", "i32"), ("scale", "fp32"),
        ("BLOCK", "constexpr")]
    with pytest.raises(ValueError, match="renamed_ptr"):
        signature(kernel, "bf16", renamed_ptr="*fp32")
    with pytest.raises(ValueError, match="BLOCK"):
        signature(kernel, "bf16", BLOCK="i32")


@pytest.mark.parametrize("report,problem", [
    (Report("k", 90, "triton", 64, 16, 0, True), "spills 16 bytes"),
    (Report("k", 80, "triton", 64, 0, 200 * 1024, False), "sm_80 has 166912"),
    (Report("k", 90, "triton", 64, 0, 1024, False), "do not use wgmma"),
    (Report("k", 90, "triton", 64, 0, 1024, True, dots=4, non_wgmma_dots=2), "2 of its 4 dots"),
])
def test_gate_rejects_spills_shared_memory_and_missing_wgmma(report, problem):
    compile_gate._judge(report, allowed_spill_bytes=0, expects_wgmma=True)
    assert any(problem in p for p in report.problems), report.problems


# --------------------------------------------------------------------------------------------
# CUDA C++

nvcc_missing = pytest.mark.skipif(compile_gate.find_nvcc() is None, reason="nvcc not found")

PROBE_CU = r"""
#include <cuda_runtime.h>
#include <cutlass/array.h>
#include <cutlass/numeric_conversion.h>
#include <cutlass/numeric_types.h>

// 16-byte vectorized bf16 loads converted to fp32: the access pattern of the csrc/cuda kernels.
__global__ void probe_scale_kernel(const cutlass::bfloat16_t* __restrict__ in,
                                   float* __restrict__ out, float factor, int vectors) {
  using In = cutlass::AlignedArray<cutlass::bfloat16_t, 8>;
  using Out = cutlass::Array<float, 8>;
  cutlass::NumericArrayConverter<float, cutlass::bfloat16_t, 8> convert;
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < vectors) {
    Out values = convert(reinterpret_cast<const In*>(in)[i]);
    for (int k = 0; k < 8; ++k) values[k] *= factor;
    reinterpret_cast<Out*>(out)[i] = values;
  }
}
"""


@nvcc_missing
def test_nvcc_probe_with_cutlass_headers(tmp_path):
    if compile_gate.cutlass_include_dir() is None:
        pytest.skip("nvidia-cutlass is not installed")
    source = tmp_path / "probe.cu"
    source.write_text(PROBE_CU)
    reports = compile_gate.compile_cuda(source, 90)
    assert len(reports) == 1 and reports[0].ok, reports
    assert "probe_scale_kernel" in reports[0].name
    assert reports[0].registers > 0 and reports[0].spill_bytes == 0


@nvcc_missing
def test_nvcc_failure_is_reported(tmp_path):
    source = tmp_path / "broken.cu"
    source.write_text("__global__ void k() { undefined_symbol(); }\n")
    reports = compile_gate.compile_cuda(source, 80)
    assert not reports[0].ok and "nvcc failed" in reports[0].problems[0]


CUDA_SOURCES = compile_gate.cuda_sources() or [pytest.param(
    None, marks=pytest.mark.skip(reason="no csrc/**/*.cu yet: the CUDA kernels come with the kernel issues"))]


@nvcc_missing
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: getattr(p, "name", "none"))
@pytest.mark.parametrize("arch", compile_gate.ARCHS)
def test_every_cuda_source_compiles(source, arch):
    reports = compile_gate.compile_cuda(source, arch)
    assert all(r.ok for r in reports), "\n".join(f"{r.name}: {r.problems}" for r in reports)
