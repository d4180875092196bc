#!/usr/bin/env bash
# The GPU suite: CLIP ViT-B/16 + 12-layer 512-wide text tower, bf16, mmcl under `deepspeed` vs
# OpenCLIP's same model; samples/s, MFU, peak memory and the largest global batch, for the
# chunked vs the dense loss, patch dropout 0 / 0.5 and eager / torch.compile (benchmarks/gpu_suite.py).
#
#   bash benchmarks/gpu_suite.sh                 # on a CUDA machine: full sizes, one GPU
#   bash benchmarks/gpu_suite.sh --smoke         # tiny sizes on the CPU: tests the script itself
#   GPUS=8 bash benchmarks/gpu_suite.sh          # more GPUs per node (the batch is per rank)
#   OUT=/some/dir bash benchmarks/gpu_suite.sh [extra gpu_suite.py options, e.g. --compile false]
#
# Offline GPU box whose python has torch and transformers only: put the wheels of the missing
# packages (deepspeed, open_clip_torch, webdataset, ... for that python and platform) in .whl/ at
# the repository root; they are installed into /tmp/site (nothing in the system python changes).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-${PWD}/benchmarks/gpu_suite_out}
GPUS=${GPUS:-1}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"

if compgen -G ".whl/*.whl" > /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=${PWD}${PYTHONPATH:+:$PYTHONPATH}  # mmcl from this checkout, not an installed copy
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

smoke=0
for arg in "$@"; do [ "$arg" = "--smoke" ] && smoke=1; done
if [ "$smoke" = 1 ] || ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
  [ "$smoke" = 1 ] || { echo "gpu_suite: no CUDA device; run with --smoke to test the script on the CPU" >&2; exit 2; }
fi

"$PYTHON" -c "import torch, platform; print('host:', platform.node(), '| torch', torch.__version__, '| cuda', torch.version.cuda, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

PORT=$("$PYTHON" -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
"$PYTHON" -m deepspeed.launcher.runner --num_gpus "$GPUS" --master_port "$PORT" benchmarks/gpu_suite.py \
  --out "$OUT/gpu_suite.jsonl" "$@" 2>&1 | tee "$OUT/gpu_suite.log"
echo "results: $OUT/gpu_suite.jsonl, log: $OUT/gpu_suite.log"
