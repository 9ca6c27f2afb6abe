#!/usr/bin/env bash
# Launch training (or any longvila_mcore module) on this node with torchrun.
#
#   launch/torchrun.sh +stage=5_sft_1024f parallel.ulysses=4 parallel.ring=2      # one node
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/torchrun.sh +stage=...         # on node 0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 launch/torchrun.sh +stage=...         # on node 1
#
# Environment (defaults in brackets): NNODES [1], NODE_RANK [0], NPROC_PER_NODE [GPUs on this
# node, or 1 without GPUs], MASTER_ADDR [127.0.0.1], MASTER_PORT [29500],
# MODULE [longvila_mcore.train]. Arguments are passed to the module (Hydra overrides for train).
set -euo pipefail

if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    NPROC_PER_NODE=$(nvidia-smi --list-gpus | wc -l)
  else
    NPROC_PER_NODE=1
  fi
fi

exec torchrun \
  --nnodes "${NNODES:-1}" \
  --node-rank "${NODE_RANK:-0}" \
  --nproc-per-node "${NPROC_PER_NODE}" \
  --master-addr "${MASTER_ADDR:-127.0.0.1}" \
  --master-port "${MASTER_PORT:-29500}" \
  -m "${MODULE:-longvila_mcore.train}" "$@"
