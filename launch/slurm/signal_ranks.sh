#!/usr/bin/env bash
# Send a signal to this job's training ranks on this node; run by train.sbatch on every node as
#   srun --overlap --nodes=N --ntasks=N --ntasks-per-node=1 --gres=none launch/slurm/signal_ranks.sh USR1 [launcher|srun]
# A rank is a process of the same job and node (SLURM_JOB_ID, SLURM_NODEID) that
#   launcher (default): started with LOCAL_RANK set by torchrun/deepspeed while its parent (the launcher) did not;
#   srun:               is a Python task of `srun python -m ds_vicuna.train` (SLURM_PROCID set, parent slurmstepd).
# Only ranks that already handle the signal get it (one still starting would die of it); while none is ready,
# try again every second, for up to WAIT_S seconds (default 900: a big model can take minutes to load).
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/../_common.sh"
sig=${1:-USR1}
kind=${2:-launcher}
deadline=$((SECONDS + ${WAIT_S:-900}))
is_rank() {
  if [ "$kind" = srun ]; then
    dsv_is_rank "$1" SLURM_PROCID && [[ "$(readlink "/proc/$1/exe")" == *python* ]]
  else
    dsv_is_rank "$1"
  fi
}
while :; do
  n=0
  # one grep over every process for this job's (a node may run hundreds), then the finer checks on those
  for file in $(grep -lzx "SLURM_JOB_ID=$SLURM_JOB_ID" /proc/[0-9]*/environ 2>/dev/null); do
    pid=${file#/proc/}; pid=${pid%/environ}
    [ "$pid" != $$ ] || continue
    tr '\0' '\n' 2>/dev/null < "$file" | grep -qx "SLURM_NODEID=$SLURM_NODEID" || continue
    if is_rank "$pid" && dsv_catches "$pid" "$sig"; then kill "-$sig" "$pid" 2>/dev/null && n=$((n + 1)); fi
  done
  if [ "$n" -gt 0 ] || [ "$SECONDS" -ge "$deadline" ]; then break; fi
  sleep 1
done
echo "[signal_ranks] $(hostname) node $SLURM_NODEID: SIG$sig to $n rank(s)"
