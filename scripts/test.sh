#!/usr/bin/env bash
# The test suite, slow end-to-end runs included (GPU tests skip themselves without CUDA).
# Quick loop while developing: bash scripts/test.sh -m "not slow"
# Uses the project's .venv (made by scripts/install.sh) without needing it activated: a new user's
# `bash scripts/test.sh` in a fresh shell used whatever python came first on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE=offline HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled
PY=.venv/bin/python
if [ ! -x "$PY" ]; then
  echo "scripts/test.sh: no .venv here; run 'bash scripts/install.sh' first" >&2
  exit 2
fi
# Ray actors and subprocesses the tests start inherit PATH: put the venv first.
export PATH="$PWD/.venv/bin:$PATH"
# --durations: the slowest tests close the log, to keep the suite under CI's 15 minutes
exec "$PY" -m pytest -q --timeout=900 --durations=15 "$@"
