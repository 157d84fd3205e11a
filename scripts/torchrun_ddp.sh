#!/usr/bin/env bash
# torchrun launch of any recipe (single node by default; set NNODES/NODE_RANK/MASTER_ADDR for more).
# Lightning detects TorchElastic and uses the ranks torchrun gives it.
#   CONFIG=configs/backdoor/rt_minilm_badnet.yaml NPROC=4 bash scripts/torchrun_ddp.sh
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-configs/backdoor/mnist_badnets.yaml}
NPROC=${NPROC:-2}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
ACCEL=${ACCEL:-auto}
.venv/bin/torchrun --nproc_per_node "$NPROC" --nnodes "$NNODES" --node_rank "$NODE_RANK" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  -m recipes fit --config "$CONFIG" \
  --trainer.strategy ddp --trainer.accelerator "$ACCEL" \
  --trainer.devices "$NPROC" --trainer.num_nodes "$NNODES" "$@"
