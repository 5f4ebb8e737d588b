#!/usr/bin/env bash
# One-shot GPU check (../shared/GPU.md): build with the CUDA extension, correctness table, GPU
# test suite, ceilings, benchmarks vs eager, results table + JSON named after the card.
#
#   bash benchmarks/gpu_check.sh            on a GPU machine (torch with CUDA already installed;
#                                           no network: installs with --no-deps)
#   bash benchmarks/gpu_check.sh --dry-run  the same steps on the CPU with the CPU install
#                                           (scripts/install.sh), quick benchmark rounds
#
# Results go to $OUT (default benchmarks/results/). Each step has a time limit so that the whole
# run stays under 8 minutes on one H100; a failing step is recorded and the run goes on, and the
# exit status is non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; fi
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
WORK="$(mktemp -d)"
FAILED=()

if [[ $DRY_RUN == 1 ]]; then
  PY="${PYTHON:-.venv/bin/python}"
  TESTS=(tests/test_pixel_shuffle_layernorm.py tests/test_multimodal_embed.py tests/test_reference.py
         tests/test_harness.py)
  BENCH_ARGS=(--benchmark-min-rounds=1 --benchmark-max-time=0.05 --benchmark-warmup=off)
  DEVICE=cpu
else
  PY="${PYTHON:-python}"
  # the compile gate is CPU CI's job (and the build step compiles every .cu file anyway)
  TESTS=(tests --ignore=tests/test_compile_gate.py)
  # GPU timings only: the CPU rows are CI's
  BENCH_ARGS=(-k "cuda or varlen_attention or cross_attention" --benchmark-min-rounds=5 --benchmark-max-time=0.5 --benchmark-warmup=on)
  DEVICE=cuda
fi

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s)"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | tail -n 40
  local status=${PIPESTATUS[0]}
  echo "== $name: exit $status after $((SECONDS - start))s"
  if [[ $status != 0 ]]; then FAILED+=("$name"); fi
}

BUILD_SECONDS=0
if [[ $DRY_RUN == 0 ]]; then
  start=$SECONDS
  step build 300 env MAX_JOBS="$(nproc)" "$PY" -m pip install --no-build-isolation --no-deps -v -e .
  BUILD_SECONDS=$((SECONDS - start))
fi
step backends 60 "$PY" -c "import nvlm_kernels as nk; [print(s) for s in nk.available_backends().values()]"
step check 120 "$PY" -m nvlm_kernels.check --device "$DEVICE"
step tests 300 "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}"
step ceilings 60 "$PY" benchmarks/ceilings.py --device "$DEVICE" --out "$WORK/ceilings.json"
# One step (and one JSON) per group of benchmarks: a step that runs past its limit loses only
# its own rows. The attention steps compile FlexAttention baselines, the slowest part, and
# the "triton_tuned" rows compile and time every candidate configuration once per key.
BENCH_FILES=(benchmarks/test_bench_pixel_shuffle.py benchmarks/test_bench_pixel_shuffle_layernorm.py
             benchmarks/test_bench_multimodal_embed.py benchmarks/test_bench_train_step.py)
step benchmarks_ops 120 "$PY" -m pytest -q -p no:cacheprovider "${BENCH_FILES[@]}" \
  "${BENCH_ARGS[@]}" --benchmark-json="$WORK/bench-ops.json"
step benchmarks_varlen 270 "$PY" -m pytest -q -p no:cacheprovider \
  benchmarks/test_bench_varlen_attention.py "${BENCH_ARGS[@]}" --benchmark-json="$WORK/bench-varlen.json"
step benchmarks_cross 180 "$PY" -m pytest -q -p no:cacheprovider \
  benchmarks/test_bench_cross_attention.py "${BENCH_ARGS[@]}" --benchmark-json="$WORK/bench-cross.json"

echo "== report"
BENCH_JSON=()
for f in "$WORK"/bench-*.json; do [[ -f "$f" ]] && BENCH_JSON+=("$f") && cp "$f" "$OUT/"; done
if [[ -f "$WORK/ceilings.json" && ${#BENCH_JSON[@]} != 0 ]]; then
  "$PY" benchmarks/report.py --bench "${BENCH_JSON[@]}" --ceilings "$WORK/ceilings.json" \
    --out-dir "$OUT" --extra "build_seconds=$BUILD_SECONDS" --extra "dry_run=$DRY_RUN" \
    --extra "failed_steps=${FAILED[*]:-}" || FAILED+=(report)
else
  FAILED+=(report)
fi
rm -rf "$WORK"
if [[ ${#FAILED[@]} != 0 ]]; then
  echo "FAILED steps: ${FAILED[*]}"
  exit 1
fi
echo "all steps passed"
