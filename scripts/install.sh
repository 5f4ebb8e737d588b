#!/usr/bin/env bash
# Installs the project into ./.venv on a fresh machine: torch (CPU build unless $TORCH_SPEC says
# otherwise), the other dependencies, then the package with its native extension.
#
#   bash scripts/install.sh                  CPU machine (torch==2.13.0, the CPU wheel here)
#   TORCH_SPEC="torch==2.11.0" bash scripts/install.sh   another torch (e.g. a CUDA build)
#
# Re-running it is cheap: what is installed already is kept, and the extension is rebuilt.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if [[ ! -x .venv/bin/python ]]; then
  "$PYTHON" -m venv .venv
fi
PY=.venv/bin/python
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

# torch first: the extension compiles against the torch that is installed.
if ! "$PY" -c "import torch" 2>/dev/null; then
  "${PIP[@]}" "${TORCH_SPEC:-torch==2.13.0}"
fi
"${PIP[@]}" -r requirements-dev.txt
# --no-build-isolation: build against the torch above instead of downloading another one.
"${PIP[@]}" --no-build-isolation -e .
"$PY" -c "import nvlm_kernels as nk; [print('  ', s) for s in nk.available_backends().values()]"
