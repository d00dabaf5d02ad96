"""`ds-vicuna train --ranks N`: the deepspeed launcher for N ranks on this machine, a free rendezvous port, and
stop signals that reach every rank.

    ds-vicuna train demo --ranks 2 --data.train_path data/train.jsonl     # a free port is picked
    ds-vicuna train CONFIG.yaml --ranks 8 --master-port 29600              # or named (an error if it is taken)

SIGTERM or SIGUSR1 to this process, or SIGINT (Ctrl-C, sent on as SIGTERM), is forwarded to the training ranks
only, never to the deepspeed launcher (which would kill its ranks before they save), as `launch/_common.sh` does:
the ranks finish the step, write one checkpoint together and exit 75, and so does this process; the same command
with `--resume auto` continues. A signal that arrives while the ranks are still starting is kept and delivered
as soon as one of them has its handler installed. The launcher runs in its own session, so a terminal's Ctrl-C
reaches only this process; a second Ctrl-C kills the launcher and its ranks at once, without a checkpoint.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ds_vicuna.train.launch_env import free_port
from ds_vicuna.train.preemption import REQUEUE_EXIT_CODE

EXIT_STATUS_FILE_ENV = "DS_VICUNA_EXIT_STATUS_FILE"
FORWARDED = {signal.SIGTERM: signal.SIGTERM, signal.SIGUSR1: signal.SIGUSR1, signal.SIGINT: signal.SIGTERM}


class LaunchError(RuntimeError):
    """The local launch cannot start (e.g. the rendezvous port is taken); the message says what to change."""


def check_port_free(port: int) -> None:
    """Raises LaunchError when `port` cannot be bound on 127.0.0.1 (another job's rendezvous holds it)."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as err:
            raise LaunchError(f"--master-port {port} is in use on this machine ({err.strerror}); pick another "
                              "or leave --master-port out to use a free one") from None


def launcher_command(config: str | None, overrides: list[str], ranks: int, master_port: int) -> list[str]:
    """The `deepspeed --num_gpus N --master_port P --module ds_vicuna.train ...` command for this machine."""
    return [sys.executable, "-u", "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
            "--master_port", str(master_port), "--module", "ds_vicuna.train", *([config] if config else []),
            *overrides]


def training_ranks(root_pid: int) -> list[int]:
    """Training ranks below `root_pid`: processes started with LOCAL_RANK whose parent was not (not the
    launchers, not a dataloader worker)."""
    import psutil

    ranks = []
    try:
        children = psutil.Process(root_pid).children(recursive=True)
    except psutil.Error:
        return []
    for proc in children:
        try:
            if "LOCAL_RANK" in proc.environ() and "LOCAL_RANK" not in proc.parent().environ():
                ranks.append(proc.pid)
        except psutil.Error:
            continue
    return ranks


def catches(pid: int, sig: signal.Signals) -> bool:
    """True when process `pid` has a handler installed for `sig` (SigCgt in /proc/PID/status): a rank still
    importing torch would be killed by the signal instead of checkpointing."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    for line in status.splitlines():
        if line.startswith("SigCgt:"):
            return bool((int(line.split()[1], 16) >> (int(sig) - 1)) & 1)
    return False


class _Forwarder:
    """The signal state of one launch: which stop signal is pending and whether a rank has it."""

    def __init__(self, root_pid: int):
        self.root_pid = root_pid
        self.pending: signal.Signals | None = None
        self.received: signal.Signals | None = None
        self.delivered = False
        self.interrupts = 0

    def handle(self, signum: int, frame) -> None:
        received = signal.Signals(signum)
        if received == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:
                print("[ds-vicuna] second SIGINT: killing the launcher and its ranks (no checkpoint)",
                      file=sys.stderr, flush=True)
                os.killpg(self.root_pid, signal.SIGKILL)
                return
        self.received, self.pending, self.delivered = received, FORWARDED[received], False

    def deliver(self) -> None:
        ready = [pid for pid in training_ranks(self.root_pid) if catches(pid, self.pending)]
        for pid in ready:
            try:
                os.kill(pid, self.pending)
            except ProcessLookupError:
                continue
        if ready:
            self.delivered = True
            print(f"[ds-vicuna] received {self.received.name}: sent {self.pending.name} to {len(ready)} training "
                  "rank(s); they checkpoint at the end of this step and exit "
                  f"{REQUEUE_EXIT_CODE} (Ctrl-C again to kill them now)", file=sys.stderr, flush=True)


def run_ranks(command: list[str], poll_s: float = 0.2) -> int:
    """Run the launcher `command`, forwarding stop signals to its training ranks; returns the exit status.

    Returns:
        The launcher's status; REQUEUE_EXIT_CODE (75) when the ranks checkpointed and asked for a restart
        (torchrun and the deepspeed launcher report a rank's 75 as their own failure, so ranks also write it to
        `$DS_VICUNA_EXIT_STATUS_FILE`), or when a stop signal arrived and the launch did not end cleanly.
    """
    fd, status_file = tempfile.mkstemp(prefix="ds-vicuna-exit.")
    os.close(fd)
    env = {**os.environ, EXIT_STATUS_FILE_ENV: status_file}
    proc = subprocess.Popen(command, env=env, start_new_session=True)
    forwarder = _Forwarder(proc.pid)
    previous = {sig: signal.signal(sig, forwarder.handle) for sig in FORWARDED}
    try:
        while proc.poll() is None:
            if forwarder.pending is not None and not forwarder.delivered:
                forwarder.deliver()
            time.sleep(poll_s)
        rc = proc.returncode
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if proc.poll() is None:  # an exception here: leave no ranks behind
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        written = Path(status_file).read_text().strip() if Path(status_file).is_file() else ""
        Path(status_file).unlink(missing_ok=True)
    if rc not in (0, REQUEUE_EXIT_CODE) and written == str(REQUEUE_EXIT_CODE):
        rc = REQUEUE_EXIT_CODE
    if rc not in (0, REQUEUE_EXIT_CODE) and forwarder.received is not None:
        print(f"[ds-vicuna] stopped by {forwarder.received.name} (launcher status {rc}): exit {REQUEUE_EXIT_CODE}"
              "; `--resume auto` continues from the last checkpoint", file=sys.stderr, flush=True)
        rc = REQUEUE_EXIT_CODE
    return rc


def launch_local(config: str | None, overrides: list[str], ranks: int, master_port: int | None = None) -> int:
    """`ds-vicuna train --ranks N`: N ranks on this machine through the deepspeed launcher.

    Args:
        master_port: the rendezvous port; None picks a free one (two jobs on one machine never collide).

    Returns:
        The exit status (see `run_ranks`).

    Raises:
        LaunchError: the named port is in use.
    """
    if master_port is None:
        master_port = free_port()
    else:
        check_port_free(master_port)
    command = launcher_command(config, overrides, ranks, master_port)
    print("[ds-vicuna] launching: " + " ".join(command), flush=True)
    return run_ranks(command)
