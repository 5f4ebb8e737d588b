#!/usr/bin/env bash
# The one-shot GPU check (benchmarks/gpu_check.py; docs/gpu.md): every number a short GPU lease
# should bring back, in order of value, inside one deadline (420 s by default).
#
#   bash benchmarks/gpu_prep.sh               here, once: the wheels the GPU machine lacks -> .whl/
#   bash benchmarks/gpu_check.sh              on the GPU machine; results in $OUT (default
#                                             benchmarks/results/latest)
#   bash benchmarks/gpu_check.sh --dry-run    here: the same stages on the CPU, tiny shapes
#
# On the GPU machine, python3 is the interpreter that holds torch; the carried wheels (.whl/, e.g.
# nvidia-cutlass for the CUDA build's headers) are installed into a private folder first.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

if [[ " $* " == *" --dry-run "* ]]; then
  PY="${PYTHON:-.venv/bin/python}"
else
  PY="${PYTHON:-python3}"
  if compgen -G ".whl/*.whl" > /dev/null; then
    SITE=/tmp/nvlm-gpu-check-site
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" .whl/*.whl && export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
exec "$PY" benchmarks/gpu_check.py "$@"
