#!/usr/bin/env bash
# Submit a run to a local Ray head started from the project venv, the way a cluster run is launched.
#   bash deploy/submit_local.sh [hydra overrides...]
# Run dirs go to this checkout's outputs/ (run_root), not into Ray's temporary copy of the
# working dir, which Ray deletes with its session. On a cluster, pass run_root=/shared/storage.
# The head needs RAY_AUTH_MODE=disabled (or token auth configured on the client); its dashboard
# (the job API) stays on 127.0.0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export RAY_AUTH_MODE=disabled
started=0
if ! ray status >/dev/null 2>&1; then
  ray start --head --num-cpus="$(nproc)" --include-dashboard=true --dashboard-host=127.0.0.1 \
    --dashboard-port=8265 --disable-usage-stats >/dev/null
  started=1
fi
trap '[ "$started" = 1 ] && ray stop >/dev/null 2>&1 || true' EXIT
ray job submit --address http://127.0.0.1:8265 --working-dir . \
  --runtime-env-json '{"excludes": [".venv", "outputs", ".git", "wandb"], "env_vars": {"WANDB_MODE": "offline"}}' \
  -- python -m rlpost.run experiment=toy_moe_local "run_root=$PWD/outputs" "$@"
