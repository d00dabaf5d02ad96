"""`ds-vicuna train --ranks N`: a free rendezvous port (or a named one), and stop signals that reach every rank.

    .venv/bin/python -m pytest tests/train/test_local_launch.py -q

The slow test sends real signals to a real `ds-vicuna train --ranks 2` (deepspeed launcher, 2 CPU ranks, ZeRO-3 +
CPU offload, a tiny random Llama): SIGTERM to the process, then Ctrl-C as a terminal sends it (to its process
group); both times the two ranks checkpoint together, exit, and the command exits 75.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from ds_vicuna.cli import main as cli_main
from ds_vicuna.train.local_launch import LaunchError, check_port_free, launcher_command, training_ranks
from tests.support.tiny_llama import REPO, make_tiny_model, subprocess_env, write_conversations, write_train_config


def test_launcher_command_names_the_port():
    command = launcher_command("demo", ["--max_steps", "2"], 2, 29612)
    assert command[1:] == ["-u", "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", "29612",
                           "--module", "ds_vicuna.train", "demo", "--max_steps", "2"]


def test_a_named_port_in_use_is_an_error_before_anything_starts(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        with pytest.raises(LaunchError, match=f"--master-port {port} is in use on this machine"):
            check_port_free(port)
        code = cli_main(["train", "--data.train_path", "x.jsonl", "--ranks", "2", "--master-port", str(port)])
    assert code == 2 and f"--master-port {port} is in use" in capsys.readouterr().err


def test_bad_ranks_and_a_bad_config_fail_once_before_the_launcher(capsys):
    assert cli_main(["train", "--ranks", "two"]) == 2
    assert "--ranks expects a whole number, got 'two'" in capsys.readouterr().err
    assert cli_main(["train", "--ranks", "2", "--train.epochs", "zero"]) == 2
    err = capsys.readouterr().err
    assert "train.epochs: expected int" in err and "launching" not in err


def steps_logged(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.is_file() else []  # a last line without "\n" is unfinished
    return [r["step"] for r in map(json.loads, lines) if "loss" in r]


def start(cfg: Path, log: Path, *args: str) -> subprocess.Popen:
    """`ds-vicuna train CFG --ranks 2 ...` in its own session, as a shell would run it in a terminal."""
    env = {**subprocess_env(), "PYTHONUNBUFFERED": "1", "DS_VICUNA_DIST_TIMEOUT_S": "60"}
    return subprocess.Popen([sys.executable, "-m", "ds_vicuna.cli", "train", str(cfg), "--ranks", "2", *args],
                            env=env, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop_and_wait(proc: subprocess.Popen, out: Path, log: Path, send, after_step: int, timeout: float = 400) -> int:
    """Wait until `after_step` is logged, `send(proc)`, and wait for the exit; every rank must be gone then."""
    deadline = time.monotonic() + timeout
    try:
        while max(steps_logged(out), default=0) < after_step:
            assert proc.poll() is None, f"exited {proc.returncode} early:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no step {after_step}:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)
        ranks = training_ranks(proc.pid)
        assert len(ranks) == 2, ranks
        send(proc)
        code = proc.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    alive = [pid for pid in ranks if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    assert not alive, f"ranks {alive} outlived the launch (orphans):\n{log.read_text()[-3000:]}"
    return code


@pytest.mark.slow
def test_sigterm_and_ctrl_c_reach_both_ranks_which_checkpoint_and_exit_75(tmp_path):
    model = make_tiny_model(tmp_path / "model")
    data = write_conversations(tmp_path / "train.jsonl", n=48, seed=3)
    out = tmp_path / "out"
    cfg = write_train_config(tmp_path / "config.yaml", model, data, data_opts={"batching": "pack"}, output_dir=out,
                             learning_rate=1.0e-3, epochs=100, max_steps=200, global_batch_size=4,
                             micro_batch_size=1, save_every=1000)
    log = tmp_path / "first.log"
    code = stop_and_wait(start(cfg, log), out, log, lambda p: os.kill(p.pid, signal.SIGTERM), after_step=2)
    text = log.read_text()
    assert code == 75, text[-3000:]
    assert "received SIGTERM: sent SIGTERM to 2 training rank(s)" in text
    first = sorted(p.name for p in out.glob("step-*"))
    assert len(first) == 1 and (out / first[0] / "hf" / "config.json").is_file(), first  # the preemption checkpoint
    stopped_at = int(first[0].split("-")[1])
    assert 2 <= stopped_at < 200 and steps_logged(out) == list(range(1, stopped_at + 1))

    # Ctrl-C in a terminal: SIGINT to the foreground process group, which holds `ds-vicuna train` only
    log = tmp_path / "second.log"
    code = stop_and_wait(start(cfg, log, "--resume", "auto"), out, log, lambda p: os.killpg(p.pid, signal.SIGINT),
                         after_step=stopped_at + 2)
    text = log.read_text()
    assert code == 75, text[-3000:]
    assert f"resumed from {out / first[0]} at step {stopped_at}" in text
    assert "received SIGINT: sent SIGTERM to 2 training rank(s)" in text
    last = max(int(p.name.split("-")[1]) for p in out.glob("step-*"))
    assert last >= stopped_at + 2 and steps_logged(out) == list(range(1, last + 1))  # each step once
