#!/usr/bin/env bash
# One machine, N GPUs (or N CPU ranks), through the DeepSpeed launcher.
#
#   launch/single_node.sh CONFIG.yaml [--key value ...]
#   GPUS=8 launch/single_node.sh configs/vicuna_7b.yaml --train.max_steps 1000
#   CPU=1 GPUS=2 launch/single_node.sh CONFIG.yaml          # CPU box: 2 gloo ranks
#
# which runs:
#   deepspeed --num_gpus $GPUS --master_port $MASTER_PORT --no_local_rank --module ds_vicuna.train CONFIG.yaml \
#       [--key value ...] --resume auto
#
# Knobs (environment):
#   GPUS=1            ranks on this machine (GPUs; CPU ranks with CPU=1)
#   MASTER_PORT=29500 rendezvous port on 127.0.0.1; pick another for a second job on the same machine
#   plus PYTHON, TRAIN_MODULE, RESUME, CPU, REQUEUE_EXIT_CODE (see launch/_common.sh)
#
# Exit status: the trainer's; 75 after a preemption checkpoint (SIGTERM/SIGUSR1 to this script), so a loop like
#   until launch/single_node.sh CONFIG.yaml; rc=$?; [ $rc -ne 75 ]; do :; done
# keeps a spot machine training across reclaims.
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

: "${GPUS:=1}"
: "${MASTER_PORT:=29500}"
[ $# -ge 1 ] || { echo "usage: $0 CONFIG.yaml [--key value ...]" >&2; exit 2; }

dsv_trainer_args "$@"
# `python -m deepspeed.launcher.runner` is the `deepspeed` command, run by the interpreter we were given.
dsv_run_forwarding "$PYTHON" -u -m deepspeed.launcher.runner --num_gpus "$GPUS" --master_port "$MASTER_PORT" \
  --no_local_rank --module "$TRAIN_MODULE" "${DSV_ARGS[@]}"
