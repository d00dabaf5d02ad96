# Shared by the launch scripts (sourced, not run). Knobs every script understands:
#   PYTHON=python3        interpreter that has ds_vicuna, torch and deepspeed installed
#   TRAIN_MODULE=ds_vicuna.train   the training entry point (`python -m TRAIN_MODULE CONFIG [--key value]`)
#   RESUME=auto           passed as `--resume $RESUME`; `auto` continues from the newest complete checkpoint,
#                         so a restart after preemption needs no flag changes. RESUME= (empty) starts fresh.
#   CPU=0                 CPU=1: DeepSpeed's CPU accelerator, gloo backend; "GPUs" become CPU ranks
#   REQUEUE_EXIT_CODE=75  the trainer exits with this after a preemption checkpoint (ds_vicuna.preemption)
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

# dsv_is_rank PID: true if PID started with LOCAL_RANK in its environment and its parent did not,
# i.e. it is a training rank spawned by deepspeed/torchrun (not a launcher, not a dataloader worker).
dsv_is_rank() {
  local pid=$1 ppid
  tr '\0' '\n' < "/proc/$pid/environ" 2>/dev/null | grep -q '^LOCAL_RANK=' || return 1
  ppid=$(awk '{print $4}' "/proc/$pid/stat" 2>/dev/null) || return 1
  ! tr '\0' '\n' < "/proc/$ppid/environ" 2>/dev/null | grep -q '^LOCAL_RANK='
}

# dsv_descendants PID: every descendant pid of PID (depth first).
dsv_descendants() {
  local child
  for child in $(pgrep -P "$1"); do echo "$child"; dsv_descendants "$child"; done
}

# dsv_signal_ranks SIG ROOT_PID: send SIG to the training ranks below ROOT_PID. Prints how many it signalled.
dsv_signal_ranks() {
  local sig=$1 root=$2 pid n=0
  for pid in $(dsv_descendants "$root"); do
    if dsv_is_rank "$pid"; then kill "-$sig" "$pid" 2>/dev/null && n=$((n + 1)); fi
  done
  echo "$n"
}

# dsv_run_forwarding CMD...: run CMD (a launcher), forward SIGTERM/SIGUSR1 to its ranks, return its status.
# Returns REQUEUE_EXIT_CODE when the trainer asked for a restart, or when a stop signal arrived and the launcher
# did not finish cleanly (the machine is going away either way; `--resume auto` picks up the last checkpoint).
dsv_run_forwarding() {
  local child rc
  DSV_STOP_SIGNAL=""
  "$@" &
  child=$!
  _dsv_forward() {
    DSV_STOP_SIGNAL=$1
    echo "[launch] received SIG$1: forwarding to $(dsv_signal_ranks "$1" "$child") training rank(s)" >&2
  }
  trap '_dsv_forward TERM' TERM
  trap '_dsv_forward USR1' USR1
  # `wait` returns early (status > 128) each time a trapped signal arrives: wait again until CMD is gone,
  # then ask once more, since bash remembers the real exit status of a reaped child.
  while kill -0 "$child" 2>/dev/null; do wait "$child"; done
  wait "$child"; rc=$?
  trap - TERM USR1
  if [ "$rc" -ne 0 ] && [ -n "$DSV_STOP_SIGNAL" ]; then
    echo "[launch] stopped by SIG$DSV_STOP_SIGNAL (launcher status $rc): exit $REQUEUE_EXIT_CODE to be restarted" >&2
    rc=$REQUEUE_EXIT_CODE
  fi
  return "$rc"
}
