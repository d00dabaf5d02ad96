#!/usr/bin/env bash
# Several machines through torchrun: no ssh, no hostfile. Run it on EVERY node with that node's NODE_RANK.
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node-a GPUS_PER_NODE=8 launch/torchrun_multi_node.sh CONFIG.yaml   # node-a
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node-a GPUS_PER_NODE=8 launch/torchrun_multi_node.sh CONFIG.yaml   # node-b
#
# which runs on each node:
#   torchrun --nnodes $NNODES --node_rank $NODE_RANK --nproc_per_node $GPUS_PER_NODE \
#       --master_addr $MASTER_ADDR --master_port $MASTER_PORT -m ds_vicuna.train CONFIG.yaml --resume auto
#
# Knobs (environment; under srun the SLURM_* values are the defaults):
#   NNODES=1            number of nodes ($SLURM_NNODES)
#   NODE_RANK=0         this node's rank, 0..NNODES-1 ($SLURM_NODEID); node 0 hosts the rendezvous store
#   GPUS_PER_NODE=1     ranks per node (CPU ranks with CPU=1)
#   MASTER_ADDR=127.0.0.1  node 0's address as the other nodes reach it
#   MASTER_PORT=29500   rendezvous port on MASTER_ADDR
#   plus PYTHON, TRAIN_MODULE, RESUME, CPU, REQUEUE_EXIT_CODE (see launch/_common.sh)
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

: "${NNODES:=${SLURM_NNODES:-1}}"
: "${NODE_RANK:=${SLURM_NODEID:-0}}"
: "${GPUS_PER_NODE:=1}"
: "${MASTER_ADDR:=127.0.0.1}"
: "${MASTER_PORT:=29500}"
[ $# -ge 1 ] || { echo "usage: $0 CONFIG.yaml [--key value ...]" >&2; exit 2; }

dsv_trainer_args "$@"
# `python -m torch.distributed.run` is the `torchrun` command, run by the interpreter we were given.
dsv_run_forwarding "$PYTHON" -u -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK" \
  --nproc_per_node "$GPUS_PER_NODE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  -m "$TRAIN_MODULE" "${DSV_ARGS[@]}"
