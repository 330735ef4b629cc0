#!/usr/bin/env bash
# The GPU figures of bench/RESULTS.md in one command, on a machine with a CUDA build of torch:
#   bash bench/gpu.sh [LOG]
# 1. the CUDA tests (pytest -m gpu); 2. training at GPT-2-124M's shape, sequence 1024, bf16
# autocast, eager and compiled (tokens/s, MFU against a bf16 matmul peak measured in-process,
# and the top kernels of 3 profiled steps);
# 3. SmolLM2-135M prefill and decode, pellucid's engine against transformers on the same GPU in
# bf16. WEIGHTS=gguf uses the shipped file (where it is cached); the default, random, uses its
# shapes with seeded random weights (speed does not depend on them; a lent GPU machine may reach
# no registry to fetch the file). Each step runs even if an earlier one fails.
set -u
LOG=${1:-/dev/null}
PY=${PYTHON:-python3}
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
step() { echo "=== $* ($(date -u +%H:%M:%S))"; "$@"; echo "=== exit $?"; }
{
  step nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  step "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  step "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_batches.py
  step "$PY" bench/train.py --device cuda --shape gpt2-124m --context 1024 --batch 16 --steps 40 --profile
  step "$PY" bench/inference.py --device cuda --weights "${WEIGHTS:-random}" --new 128
  step "$PY" bench/train.py --device cuda --shape gpt2-124m --context 1024 --batch 16 --steps 40 \
    --compile --profile
} 2>&1 | tee "$LOG"
