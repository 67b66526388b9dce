#!/usr/bin/env bash
# Set up a development environment: a virtual environment at .venv with clipworks and its dev extras.
# Safe to run again: an existing .venv is reused and brought up to date.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r requirements-dev.txt -e '.[dev]'
.venv/bin/python -c "import clipworks, torch; print(f'clipworks {clipworks.__version__} ready (torch {torch.__version__})')"
