#!/usr/bin/env bash
# The project's test command (README, .ci/run): install into ./.venv, lint (ruff, settings in
# pyproject.toml), then run the tests and a one-round smoke run of every benchmark. Extra
# arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/ruff check --no-cache .
.venv/bin/python -m pytest tests benchmarks --benchmark-disable "$@"
