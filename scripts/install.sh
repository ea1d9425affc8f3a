#!/usr/bin/env bash
# Create .venv and install rlpost with its pinned dependencies (CPU torch first: see README).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -d .venv ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first and pinned: anything that depends on torch must find it installed, or pip pulls a
# multi-GB CUDA build. On a GPU machine, install the CUDA torch you want before this script.
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
