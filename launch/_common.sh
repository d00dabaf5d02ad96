# Shared by the launch scripts (sourced, not run). Knobs every script understands:
#   PYTHON=python3        interpreter that has ds_vicuna, torch and deepspeed installed
#   TRAIN_MODULE=ds_vicuna.train   the training entry point (`python -m TRAIN_MODULE CONFIG [--key value]`)
#   RESUME=auto           passed as `--resume $RESUME`; `auto` continues from the newest complete checkpoint,
#                         so a restart after preemption needs no flag changes. RESUME= (empty) starts fresh.
#   CPU=0                 CPU=1: DeepSpeed's CPU accelerator, gloo backend; "GPUs" become CPU ranks
#   REQUEUE_EXIT_CODE=75  the trainer exits with this after a preemption checkpoint (ds_vicuna.train.preemption)
#
# Signals: SIGTERM (spot reclaim) and SIGUSR1 (Slurm pre-timeout) sent to a launch script are forwarded to the
# training ranks only (never to the deepspeed/torchrun launcher processes, which would die on SIGUSR1 or kill
# their ranks on SIGTERM before they checkpoint). The ranks checkpoint together and exit 75; the script then
# exits 75 too, which tells a supervisor (Slurm, a spot-instance loop) to start it again.

: "${PYTHON:=python3}"
: "${TRAIN_MODULE:=ds_vicuna.train}"
: "${RESUME=auto}"
: "${CPU:=0}"
: "${REQUEUE_EXIT_CODE:=75}"

if [ "$CPU" = 1 ]; then
  export DS_ACCELERATOR=cpu            # DeepSpeed picks its CPU accelerator (gloo) even where CUDA exists
  export CUDA_VISIBLE_DEVICES=""
fi

# dsv_trainer_args CONFIG [ARGS...]: the arguments after the module name, with --resume appended.
dsv_trainer_args() {
  DSV_ARGS=("$@")
  if [ -n "$RESUME" ]; then DSV_ARGS+=(--resume "$RESUME"); fi
}

# dsv_is_rank PID [VAR]: true if PID started with VAR (default LOCAL_RANK) in its environment and its parent
# did not, i.e. it is a training rank spawned by deepspeed/torchrun (not a launcher, not a dataloader worker).
# VAR=SLURM_PROCID finds the tasks of `srun python -m ds_vicuna.train` (their parent is slurmstepd).
dsv_is_rank() {
  local pid=$1 var=${2:-LOCAL_RANK} ppid
  tr '\0' '\n' 2>/dev/null < "/proc/$pid/environ" | grep -q "^$var=" || return 1
  ppid=$(awk '{print $4}' "/proc/$pid/stat" 2>/dev/null) || return 1
  ! tr '\0' '\n' 2>/dev/null < "/proc/$ppid/environ" | grep -q "^$var="
}

# dsv_descendants PID: every descendant pid of PID (depth first).
dsv_descendants() {
  local child
  for child in $(pgrep -P "$1"); do echo "$child"; dsv_descendants "$child"; done
}

# dsv_catches PID SIG: true if PID has a handler installed for SIG (the SigCgt mask in /proc/PID/status).
# A rank that is still starting (no handler yet) would be killed by SIGUSR1 instead of checkpointing.
dsv_catches() {
  local mask num
  mask=$(awk '/^SigCgt:/ {print $2}' "/proc/$1/status" 2>/dev/null) || return 1
  [ -n "$mask" ] || return 1
  num=$(kill -l "$2" 2>/dev/null) || return 1
  (( (0x$mask >> (num - 1)) & 1 ))
}

# dsv_signal_ranks SIG ROOT_PID: send SIG to the training ranks below ROOT_PID that are ready for it.
# Prints how many it signalled.
dsv_signal_ranks() {
  local sig=$1 root=$2 pid n=0
  for pid in $(dsv_descendants "$root"); do
    if dsv_is_rank "$pid" && dsv_catches "$pid" "$sig"; then kill "-$sig" "$pid" 2>/dev/null && n=$((n + 1)); fi
  done
  echo "$n"
}

# dsv_run_forwarding CMD...: run CMD (a launcher), forward SIGTERM/SIGUSR1 to its ranks, return its status.
# A signal that arrives before any rank is ready is kept and delivered as soon as one is (ranks agree on a stop
# among themselves, so one is enough). Returns REQUEUE_EXIT_CODE when the trainer asked for a restart, or when
# a stop signal arrived and the launcher did not finish cleanly (the machine is going away either way;
# `--resume auto` picks up the last checkpoint).
dsv_run_forwarding() {
  local child rc status_file
  DSV_STOP_SIGNAL="" DSV_DELIVERED=0
  # torchrun reports a rank's exit 75 as its own failure (1): ranks that stop for a restart also write 75 here.
  status_file=$(mktemp "${TMPDIR:-/tmp}/ds-vicuna-exit.XXXXXX")
  DS_VICUNA_EXIT_STATUS_FILE=$status_file "$@" &
  child=$!
  _dsv_forward() {
    DSV_STOP_SIGNAL=$1 DSV_DELIVERED=0
    _dsv_deliver || echo "[launch] received SIG$1: no training rank can take it yet; forwarding when one can" >&2
  }
  _dsv_deliver() {
    local n
    n=$(dsv_signal_ranks "$DSV_STOP_SIGNAL" "$child")
    [ "$n" -gt 0 ] || return 1
    DSV_DELIVERED=1
    echo "[launch] received SIG$DSV_STOP_SIGNAL: forwarding to $n training rank(s)" >&2
  }
  trap '_dsv_forward TERM' TERM
  trap '_dsv_forward USR1' USR1
  # `wait` returns early (status > 128) each time a trapped signal arrives: wait again until CMD is gone,
  # then ask once more, since bash remembers the real exit status of a reaped child.
  while kill -0 "$child" 2>/dev/null; do
    if [ -n "$DSV_STOP_SIGNAL" ] && [ "$DSV_DELIVERED" = 0 ]; then
      sleep 0.5
      _dsv_deliver || true
    else
      wait "$child"
    fi
  done
  wait "$child"; rc=$?
  trap - TERM USR1
  if [ "$rc" -ne 0 ] && [ "$rc" -ne "$REQUEUE_EXIT_CODE" ] && [ "$(cat "$status_file" 2>/dev/null)" = "$REQUEUE_EXIT_CODE" ]; then
    echo "[launch] the training ranks saved a checkpoint and asked for a restart (launcher status $rc):" \
         "exit $REQUEUE_EXIT_CODE" >&2
    rc=$REQUEUE_EXIT_CODE
  fi
  rm -f "$status_file"
  if [ "$rc" -ne 0 ] && [ "$rc" -ne "$REQUEUE_EXIT_CODE" ] && [ -n "$DSV_STOP_SIGNAL" ]; then
    echo "[launch] stopped by SIG$DSV_STOP_SIGNAL (launcher status $rc): exit $REQUEUE_EXIT_CODE to be restarted" >&2
    rc=$REQUEUE_EXIT_CODE
  fi
  return "$rc"
}
