#!/usr/bin/env bash
# Send a signal to this job's training ranks on this node; run by train.sbatch as
#   srun --overlap --ntasks-per-node=1 launch/slurm/signal_ranks.sh USR1
# A rank is a process of the same job and node (SLURM_JOB_ID, SLURM_NODEID) that started with LOCAL_RANK set
# by torchrun/deepspeed while its parent (the launcher) did not.
set -uo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/../_common.sh"
sig=${1:-USR1}
n=0
for dir in /proc/[0-9]*; do
  pid=${dir#/proc/}
  env_of=$(tr '\0' '\n' < "$dir/environ" 2>/dev/null) || continue
  grep -qx "SLURM_JOB_ID=$SLURM_JOB_ID" <<<"$env_of" || continue
  grep -qx "SLURM_NODEID=$SLURM_NODEID" <<<"$env_of" || continue
  if dsv_is_rank "$pid"; then kill "-$sig" "$pid" 2>/dev/null && n=$((n + 1)); fi
done
echo "[signal_ranks] $(hostname) node $SLURM_NODEID: SIG$sig to $n rank(s)"
