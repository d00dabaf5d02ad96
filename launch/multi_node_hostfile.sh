#!/usr/bin/env bash
# Several machines through the DeepSpeed launcher and a hostfile ("host slots=GPUS" per line).
#
# With passwordless ssh (run once, on the first host; DeepSpeed starts the other hosts over pdsh/ssh):
#   HOSTFILE=hostfile launch/multi_node_hostfile.sh CONFIG.yaml [--key value ...]
#   = deepspeed --hostfile hostfile --master_addr $MASTER_ADDR --master_port $MASTER_PORT --no_local_rank \
#       --module ds_vicuna.train CONFIG.yaml --resume auto
#
# Preemption: in ssh mode the ranks are started through pdsh/sshd, not below this script, so a SIGTERM/SIGUSR1 sent
# to it cannot reach them: use NO_SSH=1 (one script per host, each forwarding to its own ranks), torchrun, or
# Slurm where machines can be reclaimed.
#
# Without ssh (run on EVERY host, each with its own NODE_RANK, same hostfile and MASTER_ADDR):
#   NO_SSH=1 NODE_RANK=0 MASTER_ADDR=host0 HOSTFILE=hostfile launch/multi_node_hostfile.sh CONFIG.yaml   # host0
#   NO_SSH=1 NODE_RANK=1 MASTER_ADDR=host0 HOSTFILE=hostfile launch/multi_node_hostfile.sh CONFIG.yaml   # host1
#   = deepspeed --hostfile hostfile --no_ssh --node_rank $NODE_RANK --master_addr host0 ...
#
# Knobs (environment):
#   HOSTFILE=hostfile   e.g. "node-a slots=8\nnode-b slots=8"; the first host is rank 0 unless MASTER_ADDR says
#   MASTER_ADDR=        address of the first host as the others reach it (default: first hostfile entry)
#   MASTER_PORT=29500   rendezvous port on MASTER_ADDR
#   NO_SSH=0            1: start only this host's ranks (needs NODE_RANK); for clusters without passwordless ssh
#   NODE_RANK=0         this host's line in the hostfile (0-based), NO_SSH=1 only; defaults to $SLURM_NODEID
#   plus PYTHON, TRAIN_MODULE, RESUME, CPU, REQUEUE_EXIT_CODE (see launch/_common.sh)
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

: "${HOSTFILE:=hostfile}"
: "${MASTER_PORT:=29500}"
: "${NO_SSH:=0}"
: "${NODE_RANK:=${SLURM_NODEID:-0}}"
[ $# -ge 1 ] || { echo "usage: $0 CONFIG.yaml [--key value ...]" >&2; exit 2; }
[ -f "$HOSTFILE" ] || { echo "$0: hostfile '$HOSTFILE' not found (set HOSTFILE)" >&2; exit 2; }
: "${MASTER_ADDR:=$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$HOSTFILE")}"

launcher=(--hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
if [ "$NO_SSH" = 1 ]; then launcher+=(--no_ssh --node_rank "$NODE_RANK"); fi

if [ "$NO_SSH" != 1 ]; then
  echo "[launch] ssh mode: stop signals sent to this script do not reach the ranks on other hosts" \
       "(NO_SSH=1 on each host does)" >&2
fi
dsv_trainer_args "$@"
dsv_run_forwarding "$PYTHON" -u -m deepspeed.launcher.runner "${launcher[@]}" \
  --no_local_rank --module "$TRAIN_MODULE" "${DSV_ARGS[@]}"
