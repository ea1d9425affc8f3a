#!/usr/bin/env bash
# The test suite, slow end-to-end runs included (GPU tests skip themselves without CUDA).
# Quick loop while developing: bash scripts/test.sh -m "not slow"
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE=offline HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled
exec python -m pytest -q --timeout=900 "$@"
