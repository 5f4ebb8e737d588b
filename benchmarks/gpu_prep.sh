#!/usr/bin/env bash
# Prepares the GPU check here, before any device time is spent: downloads what the GPU machine
# lacks (the nvidia-cutlass wheel: the CUTLASS/CuTe headers of the CUDA build) into .whl/, a
# git-ignored folder that the device call carries, then dry-runs the check on the CPU.
#
#   bash benchmarks/gpu_prep.sh            then, on the device:
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=480)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
mkdir -p .whl
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "nvidia-cutlass==4.2.0.0"
ls -l .whl
if [[ "${1:-}" != "--no-dry-run" ]]; then
  OUT="$(mktemp -d)" bash benchmarks/gpu_check.sh --dry-run
fi
