#!/usr/bin/env bash
# `./dev gpu-check`: the GPU checks in one prepared run, for a CUDA machine (about 6-8 minutes).
# Installs what it needs into the venv (./dev setup, the `gpu` extra: faiss-gpu, and NVML
# bindings for torch.cuda.utilization), then prints, each under a heading:
#   1. the gpu-marked tests (they check numbers, and skip without CUDA);
#   2. bench encoders: BiFormer-T in bf16 with the routed kernel (scaled/auto) and with the
#      reference kernel, at 224 and 896 px, then the same in fp32 (the speed ratios);
#   3. bench pipeline with biformer_tiny at 224, --decode device and --decode cpu, bf16:
#      images/s, the embed actors' forward share of the stage, the sampled GPU utilisation
#      and the peak GPU memory in use.
# Each step has its own time limit (STEP_LIMIT_S, default 170 s), so one stuck step cannot
# take the whole budget; a failed step is reported and the next one runs.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${SPARSE_EMBED_VENV:-.venv}
LIMIT=${STEP_LIMIT_S:-170}
./dev setup || exit 1
"$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || { echo "gpu-check: torch sees no CUDA device on this machine: run it on a GPU machine" >&2; exit 2; }
"$VENV/bin/python" -m pip install -q -e ".[gpu]" nvidia-ml-py >/dev/null 2>&1 \
  || echo "gpu-check: installing the gpu extra (faiss-gpu) or nvidia-ml-py failed; continuing without" >&2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
status=0
step() {
  local name=$1; shift
  echo; echo "=== $name ($(date -u +%H:%M:%S))"
  timeout "$LIMIT" "$@" || { echo "gpu-check: step '$name' failed or ran past ${LIMIT}s (exit $?)"; status=1; }
}
step "gpu-marked tests" "$VENV/bin/python" -m pytest -q -m gpu -p no:cacheprovider tests
step "bench encoders: BiFormer-T bf16, routed vs reference kernel" \
  "$VENV/bin/sparse-embed" bench encoders --suites biformer --models "scaled/auto,scaled/reference" \
  --sizes 224,896 --batch-sizes 1,32 --repeats 3 --min-time-s 5 --gpu-precision bf16
step "bench encoders: BiFormer-T fp32, routed vs reference kernel" \
  "$VENV/bin/sparse-embed" bench encoders --suites biformer --models "scaled/auto,scaled/reference" \
  --sizes 224,896 --batch-sizes 1,32 --repeats 3 --min-time-s 5 --gpu-precision fp32
step "bench pipeline: biformer_tiny 224 px, bf16, --decode device and --decode cpu" \
  "$VENV/bin/sparse-embed" bench pipeline --model biformer_tiny --precision bf16 --decode device cpu \
  --small 2000 --large 300 --batch-size 64 --decode-batch-size 64 --skip memory,listing
exit $status
