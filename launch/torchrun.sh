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

# Preemption (docs/cluster.md): Slurm signals every process of the job. The training processes
# finish their step, save and exit with status 75; torchrun forwards SIGUSR1 to them too (older
# torchruns ignore it rather than die of it) and waits for the save; this script survives the
# signals and exits with the training's status, which torchrun itself reports as 1.
trap '' USR1 TERM
export PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1  # torchrun --signals-to-handle
export PET_SHUTDOWN_TIMEOUT=${PET_SHUTDOWN_TIMEOUT:-600}  # --shutdown-timeout: time to save
LONGVILA_EXIT_STATUS_FILE=$(mktemp)
export LONGVILA_EXIT_STATUS_FILE
status=0
torchrun \
  --nnodes "${NNODES:-1}" \
  --node-rank "${NODE_RANK:-0}" \
  --nproc-per-node "${NPROC_PER_NODE}" \
  --master-addr "${MASTER_ADDR:-127.0.0.1}" \
  --master-port "${MASTER_PORT:-29500}" \
  -m "${MODULE:-longvila_mcore.train}" "$@" || status=$?
if [[ $status -ne 0 && -s $LONGVILA_EXIT_STATUS_FILE ]]; then
  status=$(<"$LONGVILA_EXIT_STATUS_FILE")
fi
rm -f "$LONGVILA_EXIT_STATUS_FILE"
exit "$status"
