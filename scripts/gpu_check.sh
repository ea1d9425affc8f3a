#!/usr/bin/env bash
# Issue 11's GPU checks in one go, on the GPU machine, stage by stage, most important first.
#
#   bash scripts/gpu_check.sh a                # plan a: env, local, vllm (issue 11 items 1, 2)
#   bash scripts/gpu_check.sh b                # plan b: engines, april, weight_push (items 4, 5)
#   bash scripts/gpu_check.sh c                # plan c: env, sglang (item 3; the sglang set)
#   bash scripts/gpu_check.sh tests local      # or stages by name
#   GPU_CHECK_DRY=1 bash scripts/gpu_check.sh a b c  # print each command and check its config (any machine)
#
# Stages: env (versions, GPU), tests (the gpu-marked tests: SGLang's real engine, the native
# engine on CUDA), local (toy_moe_local, trainer and native engine sharing the GPU, bf16), vllm
# (mixtral_tok_local with engine=vllm, sync then april, sharing the GPU), sglang (the same with
# engine=sglang), engines (bench/engines.py on the GPU, then its 0.55B model, then
# bench/routing_replay.py), april
# (bench/april.py with engine=vllm, one repeat), weight_push (bench/weight_push.py: issue 10's
# <= 3x memcpy goal where there are more cores than workers).
#
# Budget: a session has 15 minutes of device time, machine start and every transfer included, and
# one call runs at most 10 minutes. So a plan is one call that ends by GPU_CHECK_DEADLINE_S
# (default 540 s after the script starts): each stage's limit is cut to what is left, a stage
# with under 30 s left is skipped (and says so), and what ran is in $OUT/stages.txt. The RL runs
# are shortened with time_limit_s (RL seconds); their figures are wall time and eval gain at that
# budget, next to the CPU runs'.
#
# Packages: the machine has Python 3.12 and torch 2.11.0+cu130 only. `bash scripts/gpu_kit.sh`
# packs rlpost's dependencies and vLLM into .gpu/vllm/part-NN (8 calls, the last one running this
# script; `gpu_kit.sh sglang` for plan c); parts found in /tmp/kit are installed into /tmp/site
# once and put on PYTHONPATH here.
# rlpost itself is installed without dependencies (pip, setuptools and wheel are on the machine).
# Each stage writes its log under $OUT/<stage>.log and its results under $OUT (run dirs,
# bench/results/*.json); a failing stage is recorded in $OUT/stages.txt while the next runs.
#
# Written and dry-run on a CPU machine (2026-12-01); not yet run on a GPU: expect the first real
# run to need fixes, and keep them here.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-out}
PY=${PYTHON:-python3}
DRY=${GPU_CHECK_DRY:-0}
DEADLINE=$((SECONDS + ${GPU_CHECK_DEADLINE_S:-540}))
mkdir -p "$OUT"
export WANDB_MODE=offline HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

if [ "$DRY" != 1 ] && compgen -G "/tmp/kit/part-*" >/dev/null; then  # the parts gpu_kit.sh packed
  if [ ! -d /tmp/site ]; then
    t0=$SECONDS
    mkdir -p /tmp/wh && cat /tmp/kit/part-* | tar -x -C /tmp/wh && \
      "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/wh/*.whl || \
      { echo "gpu_check: installing the kit in /tmp/kit failed" | tee -a "$OUT/stages.txt"; exit 1; }
    echo "== kit installed in /tmp/site in $((SECONDS - t0)) s" | tee -a "$OUT/stages.txt"
  fi
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH
fi

RUNS=/tmp/gpu-check/runs   # run dirs stay here: only 8 files come back from $OUT
LOGS=/tmp/gpu-check/logs
mkdir -p "$RUNS" "$LOGS"
# trainer rank and rollout worker share bundle 0 and its GPU (half each), bf16 where it applies
ONE_GPU=(placement.colocate=true trainer.num_gpus=1 engine.num_gpus=1 trainer.precision=auto
         engine.dtype=bfloat16 "run_root=$RUNS" logger.progress=false)

if [ "$DRY" != 1 ] && ! "$PY" -c "import rlpost.rollout" 2>/dev/null; then
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . || \
    "$PY" -m pip install -q --no-deps --no-build-isolation --user -e .
fi

LIMIT=0
limited() {  # the stage's command under its limit (LIMIT is set by step when the stage starts)
  timeout -k 10 "$LIMIT" "$@"
}
rlpost_run() {  # a run, or in a dry run its resolved config (which validates it)
  if [ "$DRY" = 1 ]; then
    "$PY" -m rlpost.run "$@" --cfg >/dev/null && echo "  config ok: rlpost.run $*"
  else
    limited "$PY" -m rlpost.run "$@"
  fi
}

step() {  # step <stage> <limit s> <command...>: time-limited (never past the deadline), logged, recorded
  local stage=$1 want=$2; shift 2
  local t0=$SECONDS left=$((DEADLINE - SECONDS))
  LIMIT=$(( want < left ? want : left ))
  if [ "$DRY" != 1 ] && [ "$LIMIT" -lt 30 ]; then
    echo "== $stage: skipped, ${left} s left before the deadline" | tee -a "$OUT/stages.txt"; return 0
  fi
  echo "== $stage (limit ${LIMIT} s): $*" | tee -a "$OUT/stages.txt"
  if [ "$DRY" = 1 ] && [ "$1" != rlpost_run ]; then
    echo "  (dry run: not run)"; return 0
  fi
  "$@" >"$LOGS/$stage.log" 2>&1
  local rc=$?
  echo "   $stage rc=$rc in $((SECONDS - t0)) s: $(grep -h '^RESULT\|rlpost: run failed\|eval_accuracy_before' "$LOGS/$stage.log" | tail -n 2 | tr '\n' ' ')" \
    | tee -a "$OUT/stages.txt"
  tail -n 4 "$LOGS/$stage.log"
}

stage_env() {
  step env 120 bash -c "nvidia-smi; df -h /dev/shm /tmp; nproc; $PY -c 'import torch, ray, deepspeed, rlpost.rollout; print(torch.__version__, torch.cuda.get_device_name(0), ray.__version__, deepspeed.__version__)'; $PY -c 'import vllm; print(\"vllm\", vllm.__version__)'; $PY -c 'import sglang; print(\"sglang\", sglang.__version__)'; true"
}
stage_tests() {
  step tests 300 limited "$PY" -m pytest -q -m gpu tests/ -p no:cacheprovider
}
stage_local() {  # item 1: the CPU figure is 0.405 -> 0.875 in 8 min (README line 1)
  step local 240 rlpost_run experiment=toy_moe_local name=gpu_local time_limit_s=150 "${ONE_GPU[@]}"
}
stage_vllm() {  # item 2
  step vllm_sync 170 rlpost_run experiment=mixtral_tok_local engine=vllm mode=sync name=gpu_vllm_sync \
    time_limit_s=60 engine.gpu_memory_utilization=0.3 "${ONE_GPU[@]}"
  step vllm_april 170 rlpost_run experiment=mixtral_tok_local engine=vllm mode=april rollout.over_sampling=2 \
    name=gpu_vllm_april time_limit_s=60 engine.gpu_memory_utilization=0.3 "${ONE_GPU[@]}"
}
stage_sglang() {  # item 3 (the sglang set: bash scripts/gpu_kit.sh sglang)
  step sglang_engines 200 limited "$PY" bench/engines.py --device cuda --engines native-bf16,sglang-bf16 \
    --name engines_gpu_sglang
  step sglang_routing_replay 90 limited "$PY" bench/routing_replay.py --device cuda --engines native-bf16,sglang-bf16 \
    --name routing_replay_gpu_sglang
  step sglang_sync 240 rlpost_run experiment=mixtral_tok_local engine=sglang mode=sync name=gpu_sglang_sync \
    time_limit_s=60 engine.gpu_memory_utilization=0.3 "${ONE_GPU[@]}"
}
stage_engines() {  # item 4; each engine's row is written as soon as it is measured
  step engines 200 limited "$PY" bench/engines.py --device cuda --engines native,native-bf16,vllm-bf16
  step engines_large 200 limited "$PY" bench/engines.py --device cuda --large --engines native-bf16,vllm-bf16
  step routing_replay 60 limited "$PY" bench/routing_replay.py --device cuda --engines native,native-bf16
}
stage_april() {  # item 5
  step april 300 limited "$PY" bench/april.py --repeats 1 --steps 40 --configs sync,april --name april_gpu_vllm \
    --workdir "$RUNS/april" engine=vllm placement.colocate=true trainer.num_gpus=1 engine.num_gpus=1 \
    engine.dtype=bfloat16
}
stage_weight_push() {  # issue 10's <= 3x memcpy at 4 workers, on a machine with more cores than workers
  step weight_push 120 limited "$PY" bench/weight_push.py --repeats 3 --name weight_push_gpu_host
}

plan() {
  case $1 in
    a) echo "env local vllm" ;;
    b) echo "engines april weight_push" ;;
    c) echo "env sglang" ;;
    *) echo "$1" ;;
  esac
}
STAGES=()
for arg in "${@:-a}"; do
  read -r -a more <<<"$(plan "$arg")"
  STAGES+=("${more[@]}")
done
for s in "${STAGES[@]}"; do
  if ! declare -F "stage_$s" >/dev/null; then
    echo "gpu_check: unknown stage '$s' (plans a b c; stages env tests local vllm sglang engines april weight_push)" >&2
    exit 2
  fi
done
for s in "${STAGES[@]}"; do "stage_$s"; done

# What comes back: stages.txt and one archive (at most 8 files come back from $OUT): the stage
# logs, each run's summary, metrics, placement and config (no checkpoints), bench results.
if [ "$DRY" != 1 ]; then
  cp bench/results/*.json "$LOGS/" 2>/dev/null
  (cd /tmp/gpu-check && find runs -maxdepth 4 \( -name summary.json -o -name metrics.jsonl -o -name placement.json \
      -o -name config.yaml -o -name '*.log' \) -size -8M -print0 | tar -czf "$OUT/gpu_check.tgz" --null -T - logs)
  ls -l "$OUT"
fi
echo "gpu_check: done ($((SECONDS)) s); summary in $OUT/stages.txt"
cat "$OUT/stages.txt"
