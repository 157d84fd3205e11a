#!/usr/bin/env bash
# Every cluster config runs a few training steps on one GPU (a 2-process DDP run too when 2+ GPUs are visible) and
# prints, per config, steps/s and samples/s, peak GPU memory, whether the precision is what the config says, and
# any tensor or matmul that is not on the GPU. Absent hub weights, data and artifacts are replaced by random weights of
# the real architecture and synthetic data of the configured shapes (each replacement is printed). See
# docs/cluster.md. Arguments go to `python -m recipes.gpu_check` (--help), e.g.
#   bash scripts/gpu_check.sh                              # everything, full depth
#   bash scripts/gpu_check.sh --layers 2 --steps 3         # a short check: stand-in backbones cut to 2 layers
#   bash scripts/gpu_check.sh --only tar_llama3_8b_fsdp --json runs/gpu_check/rows.jsonl
#   bash scripts/gpu_check.sh --cpu                        # the same code on the tiny twins (what the tests run)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m recipes.gpu_check "$@"
