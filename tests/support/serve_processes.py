"""Serving processes for tests: `python -m ds_vicuna.serve ...` started, awaited and stopped."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time


def start(args: list[str], ready: str, timeout: float = 240) -> tuple[subprocess.Popen, list[str]]:
    """Start `python -m ds_vicuna.serve ARGS` and wait for its readiness line; output lines are kept."""
    proc = subprocess.Popen([sys.executable, "-u", "-m", "ds_vicuna.serve", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    lines: list[str] = []
    seen = threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if ready in line:
                seen.set()

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not seen.wait(0.5):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError(f"{args[0]} did not start:\n{''.join(lines)[-3000:]}")
    return proc, lines


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
