#!/usr/bin/env bash
# Packs what scripts/gpu_check.sh needs on the GPU machine (Python 3.12, torch 2.11.0+cu130, no
# network, at most 64 MiB per call) into .gpu/<set>/part-NN files of 56 MiB, with
# ../shared/gpu/kit.py, and prints the device calls that send them.
#
#   bash scripts/gpu_kit.sh          # rlpost's dependencies + vLLM 0.26.0: 8 parts, 445 MB (plans a, b)
#   bash scripts/gpu_kit.sh sglang   # rlpost's dependencies + SGLang 0.5.15: 26 parts, 1.4 GB (plan c)
#
# Why one set with rlpost's and the engine's packages: each call carries one part, and every call
# costs device time (15 minutes a session, starts and transfers included); two sets would carry
# the packages both need twice. rlpost's own dependencies are read from pyproject.toml, less what
# the checks never import: wandb (the checks log to jsonl) and Ray's dashboard extras (no `ray job
# submit` there). The SGLang set is too big for one session with a run in it: sglang-kernel is
# 615 MB (its FA3 kernels alone 1.76 GB unpacked) and flashinfer-cubin 448 MB; leaving out
# flashinfer-cubin, tokenspeed-triton and tilelang (with SGLang's triton attention and pytorch
# sampling backends) would bring it to about 14 parts, untried.
#
# Then, on the device, one call per part but the last, back to back (the machine goes back after
# 30 s idle and starts bare):
#   run(carry=[".gpu/vllm/part-00"], command="mkdir -p /tmp/kit && cp .gpu/vllm/part-00 /tmp/kit/")
# and the last part with the checks themselves (gpu_check.sh installs the parts in /tmp/kit):
#   run(carry=[".gpu/vllm/part-07"], timeout_s=600,
#       command="mkdir -p /tmp/kit && cp .gpu/vllm/part-07 /tmp/kit/ && bash scripts/gpu_check.sh a")
set -euo pipefail
cd "$(dirname "$0")/.."
SET=${1:-vllm}
SHARED=${RLPOST_SHARED:-../shared}
PY=.venv/bin/python
[ -x "$PY" ] || { echo "gpu_kit: needs the project's venv with torch (bash scripts/install.sh)" >&2; exit 1; }
[ -f "$SHARED/gpu/kit.py" ] || { echo "gpu_kit: no $SHARED/gpu/kit.py (set RLPOST_SHARED)" >&2; exit 1; }
grep -qx '/.gpu/' .gitignore || { echo "gpu_kit: .gpu/ must stay ignored (.gitignore)" >&2; exit 1; }

case "$SET" in
  vllm) DROPS=(--drop tokenspeed-triton --drop tilelang --drop pynvvideocodec --drop torchcodec) ;;  # never imported here
  sglang) DROPS=() ;;
  *) echo "gpu_kit: unknown set '$SET' (vllm, sglang)" >&2; exit 2 ;;
esac
mapfile -t REQS < <("$PY" - "$SET" <<'EOF'
import sys, tomllib
from packaging.requirements import Requirement
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for line in project["dependencies"] + project["optional-dependencies"][sys.argv[1]]:
    req = Requirement(line)
    if req.name in ("torch", "wandb"):
        continue  # the machine's torch; the checks log to jsonl
    if req.name == "ray":
        req.extras = set()  # no dashboard or job server there
    print(req)
print("pycountry")  # mistral-common's import chain needs it on Python 3.12
EOF
)
echo "gpu_kit: packing ${REQS[*]}" >&2
"$PY" "$SHARED/gpu/kit.py" pack --out ".gpu/$SET" "${REQS[@]}" "${DROPS[@]}"
