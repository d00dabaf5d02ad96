"""The launch scripts run the real trainer for real: deepspeed launcher, two simulated hosts, Slurm, preemption
and SIGKILL.

    .venv/bin/python -m pytest tests/launch/test_launch_scripts.py -q -rs

Every run is 2 CPU ranks (gloo) of `ds_vicuna.train` with ZeRO-3 + CPU offload (DeepSpeedCPUAdam). The embedded
SmolLM2 model takes a few steps through the deepspeed launcher; every other run trains a tiny random Llama
(tests/support/tiny_llama.py) for STEPS steps and is compared with one uninterrupted reference run: the same loss at
every step and the same final weights, however it was launched, interrupted and resumed.
"""
from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from ds_vicuna.train.local_launch import training_ranks as rank_pids  # the rule `--ranks N` signals by
from tests.support.cluster import NetnsPair, SlurmCluster, free_port, netns_skip_reason, slurm_skip_reason
from tests.support.tiny_llama import (ELASTIC_LOSS_RTOL, ELASTIC_WEIGHT_ATOL, REPO, make_tiny_model, subprocess_env,
                        write_conversations, write_train_config)

pytestmark = pytest.mark.slow
STEPS = 16
REQUEUE = 75


PLAIN_QA = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("How many days are there in a week?", "There are seven days in a week."),
    ("What color is the sky on a clear day?", "On a clear day the sky is blue."),
    ("Name a fruit that is yellow.", "A banana is a yellow fruit."),
    ("What do bees make?", "Bees make honey and beeswax."),
    ("What is two plus two?", "Two plus two equals four."),
    ("Which animal is known as the king of the jungle?", "The lion is often called the king of the jungle."),
    ("What do we call frozen water?", "Frozen water is called ice."),
]


# ------------------------------------------------------------------------------------------------------ helpers


def launch_env(**extra) -> dict:
    """Environment for the launch scripts: our interpreter, CPU ranks, a free rendezvous port, a short
    collective timeout (a dead peer fails the job in seconds, not the default 10 minutes)."""
    env = {**subprocess_env(), "PYTHON": sys.executable, "CPU": "1", "PYTHONUNBUFFERED": "1",
           "MASTER_PORT": str(free_port()), "DS_VICUNA_DIST_TIMEOUT_S": "60"}
    return {**env, **{k: str(v) for k, v in extra.items()}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("tiny")
    return {"model": make_tiny_model(folder / "model"),
            "data": write_conversations(folder / "train.jsonl", n=48, seed=3)}


def write_config(tiny: dict, folder: Path, steps: int = STEPS) -> Path:
    """A training config whose output (checkpoints, metrics.jsonl) goes to `folder/out`."""
    folder.mkdir(parents=True, exist_ok=True)
    return write_train_config(folder / "config.yaml", tiny["model"], tiny["data"], data_opts={"batching": "pack"},
                              output_dir=folder / "out", learning_rate=3.0e-3, warmup_ratio=0.1, epochs=100,
                              max_steps=steps, global_batch_size=4, micro_batch_size=1, save_every=2, keep_last=3)


def read(log: Path) -> str:
    """A log that may still be written to (a multi-byte character may be cut at the end)."""
    return log.read_text(errors="replace") if log.is_file() else ""


def start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> int:
    """Wait for a launch; on timeout kill its whole session (everything it started) and fail."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"{proc.args} still running after {timeout} s:\n{read(log)[-3000:]}")


def metrics(out: Path) -> dict[int, dict]:
    """step -> the last metrics record of that step (steps redone after a crash appear twice)."""
    path = out / "metrics.jsonl"
    text = path.read_text() if path.is_file() else ""
    records = [json.loads(line) for line in text.split("\n")[:-1]]  # a last line without "\n" is still being written
    return {r["step"]: r for r in records if "loss" in r}


def losses(out: Path) -> dict[int, float]:
    return {step: record["loss"] for step, record in metrics(out).items()}


def wait_for_step(out: Path, step: int, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if max(metrics(out), default=0) >= step:
            return
        if proc.poll() is not None:
            pytest.fail(f"exited {proc.returncode} before step {step}:\n{read(log)[-3000:]}")
        time.sleep(0.1)
    pytest.fail(f"no step {step} after {timeout} s:\n{read(log)[-3000:]}")


def final_weights(out: Path) -> dict:
    from ds_vicuna.train.export import consolidated_state_dict, resolve_checkpoint

    return consolidated_state_dict(resolve_checkpoint(out))


def assert_matches_reference(out: Path, reference: dict, steps: range | None = None, loss_rtol: float = 1e-6,
                             weight_atol: float = 1e-6) -> None:
    """Every loss of `steps` (default: all) and the final weights equal the uninterrupted run's.

    Weights are equal up to 1e-6: DeepSpeedCPUAdam recomputes beta**t with pow() after a resume instead of
    continuing its running product (cpu_adam.h IncrementStep), which moves a weight by an ulp or two. A resume
    at another world size is held to ELASTIC_LOSS_RTOL / ELASTIC_WEIGHT_ATOL (tiny_llama.py says why)."""
    import torch

    got = losses(out)
    steps = steps or range(1, STEPS + 1)
    assert sorted(got) == list(range(1, STEPS + 1)), sorted(got)
    for step in steps:
        assert got[step] == pytest.approx(reference["losses"][step], rel=loss_rtol, abs=1e-7), step
    weights = final_weights(out)
    assert weights.keys() == reference["weights"].keys()
    worst_loss = max(abs(got[s] - reference["losses"][s]) / abs(reference["losses"][s]) for s in steps)
    worst_weight = max((weights[n] - v).abs().max().item() for n, v in reference["weights"].items())
    print(f"{out}: losses within {worst_loss:.1e} relative, final weights within {worst_weight:.1e}")
    for name, value in reference["weights"].items():
        torch.testing.assert_close(weights[name], value, rtol=0, atol=weight_atol, msg=name)


# ------------------------------------------------------------------------------- one node, deepspeed launcher


def test_embedded_model_two_ranks_through_the_deepspeed_launcher(tmp_path):
    """(a) `launch/single_node.sh`: the deepspeed launcher, 2 local ranks, ZeRO-3 offload, SmolLM2-135M."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"id": f"qa{i}", "conversations": [
        {"from": "human", "value": question}, {"from": "gpt", "value": answer}]}) + "\n"
        for i, (question, answer) in enumerate(PLAIN_QA * 2)))
    cfg = write_train_config(tmp_path / "config.yaml", "embedded", data,
                             data_opts={"max_length": 256, "batching": "pack"}, output_dir=tmp_path / "out",
                             learning_rate=1.0e-5, max_steps=3, global_batch_size=2, micro_batch_size=1)
    log = tmp_path / "log.txt"
    assert finish(start(["launch/single_node.sh", str(cfg)], launch_env(GPUS=2), log), log, timeout=500) == 0, \
        read(log)[-3000:]
    text = read(log)
    assert "rank 0/2 (local rank 0)" in text and "rank 1/2 (local rank 1)" in text
    assert "ZeRO stage 3, optimizer DeepSpeedCPUAdam (offload optimizer: cpu, params: cpu)" in text
    got = losses(tmp_path / "out")
    assert sorted(got) == [1, 2, 3]
    # a pretrained model on plain English: far below the ~10.8 nats of a uniform guess over 49k tokens
    assert all(math.isfinite(v) and v < 4 for v in got.values()), got
    assert (tmp_path / "out" / "step-000003" / "hf" / "config.json").is_file()


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory) -> dict:
    """`launch/single_node.sh` with 2 local ranks, STEPS uninterrupted steps of the tiny model."""
    folder = tmp_path_factory.mktemp("reference")
    log = folder / "log.txt"
    proc = start(["launch/single_node.sh", str(write_config(tiny, folder))], launch_env(GPUS=2), log)
    assert finish(proc, log) == 0, read(log)[-3000:]
    return {"log": read(log), "out": folder / "out", "losses": losses(folder / "out"),
            "weights": final_weights(folder / "out")}


def test_reference_run_two_ranks_zero3_offload(reference):
    text, out = reference["log"], reference["out"]
    assert "rank 0/2 (local rank 0)" in text and "rank 1/2 (local rank 1)" in text
    assert "ZeRO stage 3, optimizer DeepSpeedCPUAdam (offload optimizer: cpu, params: cpu)" in text
    assert sorted(reference["losses"]) == list(range(1, STEPS + 1))
    assert reference["losses"][STEPS] < reference["losses"][1] - 1.0  # it learns
    assert (out / "latest").read_text() == f"step-{STEPS:06d}"
    assert sorted(p.name for p in out.glob("step-*")) == [f"step-{s:06d}" for s in (STEPS - 4, STEPS - 2, STEPS)]


def test_sigterm_checkpoints_exits_75_and_the_same_command_resumes(tiny, tmp_path, reference):
    """Spot reclaim: SIGTERM to the launch script -> every rank finishes its step, saves, exits 75; rerunning
    the same command continues from that checkpoint and ends where the uninterrupted run ended."""
    cmd, env = ["launch/single_node.sh", str(write_config(tiny, tmp_path))], launch_env(GPUS=2)
    out, log = tmp_path / "out", tmp_path / "first.txt"
    proc = start(cmd, env, log)
    wait_for_step(out, 2, proc, log)
    os.kill(proc.pid, signal.SIGTERM)
    assert finish(proc, log) == REQUEUE, read(log)[-3000:]
    text = read(log)
    assert "[launch] received SIGTERM: forwarding to 2 training rank(s)" in text
    saved = int(re.search(r"preempted \(SIGTERM received\): saved step-(\d+) at step \d+, exit 75", text)[1])
    assert 2 <= saved < STEPS and (out / "latest").read_text() == f"step-{saved:06d}"
    log2 = tmp_path / "second.txt"
    assert finish(start(cmd, env, log2), log2) == 0, read(log2)[-3000:]
    assert f"resumed from {out}/step-{saved:06d} at step {saved}" in read(log2)
    assert_matches_reference(out, reference)


@pytest.mark.parametrize("first, second", [(2, 1), (1, 2)], ids=["shrink-2-to-1", "grow-1-to-2"])
def test_sigterm_then_the_same_command_on_another_number_of_ranks(tiny, tmp_path, reference, first, second):
    """Capacity that comes back different: SIGTERM to `GPUS=first single_node.sh` (checkpoint, exit 75), then the
    same command with GPUS=second. The ZeRO-3 checkpoint is converted once to DeepSpeed's universal format and the
    run ends like the uninterrupted 2-rank run, step by step."""
    cmd = ["launch/single_node.sh", str(write_config(tiny, tmp_path))]
    out, log = tmp_path / "out", tmp_path / "first.txt"
    proc = start(cmd, launch_env(GPUS=first), log)
    wait_for_step(out, 2, proc, log)
    os.kill(proc.pid, signal.SIGTERM)
    assert finish(proc, log) == REQUEUE, read(log)[-3000:]
    assert f"rank 0/{first} (local rank 0)" in read(log)
    saved = int(re.search(r"preempted \(SIGTERM received\): saved step-(\d+)", read(log))[1])
    log2 = tmp_path / "second.txt"
    assert finish(start(cmd, launch_env(GPUS=second), log2), log2) == 0, read(log2)[-3000:]
    text = read(log2)
    assert all(f"rank {r}/{second} (local rank {r})" in text for r in range(second))
    assert f"step-{saved:06d} was written by {first} rank(s), this run has {second}: converting it once" in text
    assert f"resumed from {out}/step-{saved:06d} at step {saved}" in text
    assert_matches_reference(out, reference, loss_rtol=ELASTIC_LOSS_RTOL, weight_atol=ELASTIC_WEIGHT_ATOL)


def test_a_stop_signal_during_start_up_is_kept_until_the_first_step(tiny, tmp_path):
    """SIGUSR1 one second after start, while torch and the model load: not fatal; the run stops after step 1."""
    cfg, out, log = write_config(tiny, tmp_path), tmp_path / "out", tmp_path / "log.txt"
    proc = start([sys.executable, "-m", "ds_vicuna.train", str(cfg)], launch_env(), log)
    time.sleep(1.0)
    assert proc.poll() is None and max(metrics(out), default=0) == 0
    os.kill(proc.pid, signal.SIGUSR1)
    assert finish(proc, log) == REQUEUE, read(log)[-3000:]
    assert "preempted (SIGUSR1 received): saved step-000001 at step 1, exit 75" in read(log)
    assert sorted(losses(out)) == [1] and (out / "latest").read_text() == "step-000001"


def test_sigterm_before_the_ranks_are_ready_is_forwarded_when_they_are(tiny, tmp_path):
    """SIGTERM to `single_node.sh` while the launcher is still starting its ranks: kept by the script, sent to
    each rank once it handles SIGTERM (never killing one mid-start), and the run stops after step 1."""
    cmd, env = ["launch/single_node.sh", str(write_config(tiny, tmp_path))], launch_env(GPUS=2)
    out, log = tmp_path / "out", tmp_path / "log.txt"
    proc = start(cmd, env, log)
    time.sleep(1.0)
    os.kill(proc.pid, signal.SIGTERM)
    assert finish(proc, log) == REQUEUE, read(log)[-3000:]
    text = read(log)
    assert "[launch] received SIGTERM: no training rank can take it yet; forwarding when one can" in text
    assert re.search(r"\[launch\] received SIGTERM: forwarding to [12] training rank\(s\)", text)
    assert "preempted (SIGTERM received): saved step-000001 at step 1, exit 75" in text
    assert sorted(losses(out)) == [1] and (out / "latest").read_text() == "step-000001"


def test_sigkill_of_one_rank_fails_cleanly_and_the_restart_matches(tiny, tmp_path, reference):
    """A rank dies without warning: the job exits non-zero within the collective timeout (no hang, not 75),
    and the restart resumes from the last complete checkpoint."""
    cmd, env = ["launch/single_node.sh", str(write_config(tiny, tmp_path))], launch_env(GPUS=2)
    out, log = tmp_path / "out", tmp_path / "killed.txt"
    proc = start(cmd, env, log)
    wait_for_step(out, 5, proc, log)
    ranks = rank_pids(proc.pid)
    assert len(ranks) == 2, ranks
    killed_at = time.monotonic()
    os.kill(ranks[1], signal.SIGKILL)
    code = finish(proc, log, timeout=120)
    print(f"launch exited {code} {time.monotonic() - killed_at:.1f} s after SIGKILL of rank 1")
    assert code not in (0, REQUEUE), read(log)[-3000:]
    assert not [p for p in ranks if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    last = (out / "latest").read_text()
    log2 = tmp_path / "restart.txt"
    assert finish(start(cmd, env, log2), log2) == 0, read(log2)[-3000:]
    assert f"resumed from {out}/{last}" in read(log2)
    assert_matches_reference(out, reference)


# ----------------------------------------------------------------------------------- two simulated hosts


@pytest.fixture(scope="module")
def hosts():
    reason = netns_skip_reason()
    if reason:
        print(f"SKIP two simulated hosts: {reason}")
        pytest.skip(reason)
    with NetnsPair() as pair:
        yield pair


def run_on_two_hosts(hosts, cfg: Path, log_dir: Path, script: str, **knobs) -> list[str]:
    """Start `script` on both simulated hosts (node rank 0 on hosta, 1 on hostb); both must exit 0."""
    procs, logs, port = [], [], free_port()
    for node in (0, 1):
        logs.append(log_dir / f"host{node}.txt")
        env = launch_env(NODE_RANK=node, MASTER_ADDR="hosta", MASTER_PORT=port, **knobs)
        procs.append(hosts.popen(node, [str(REPO / script), str(cfg)], env, cwd=REPO,
                                 stdout=logs[-1].open("w"), stderr=subprocess.STDOUT))
    try:
        codes = [finish(p, log, timeout=240) for p, log in zip(procs, logs)]
    finally:
        for p in procs:  # a failed/hung host must not outlive the test
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    texts = [read(log) for log in logs]
    assert codes == [0, 0], "\n".join(t[-2000:] for t in texts)
    assert re.search(r"rank 0/2 \(local rank 0\) on hosta .*rendezvous hosta:", texts[0])
    assert re.search(r"rank 1/2 \(local rank 0\) on hostb .*rendezvous hosta:", texts[1])
    return texts


def test_two_hosts_torchrun(tiny, hosts, tmp_path, reference):
    """`launch/torchrun_multi_node.sh` on each host (no ssh): one rank per host, rendezvous on hosta."""
    run_on_two_hosts(hosts, write_config(tiny, tmp_path), tmp_path, "launch/torchrun_multi_node.sh",
                     NNODES=2, GPUS_PER_NODE=1)
    assert_matches_reference(tmp_path / "out", reference)


def test_two_hosts_deepspeed_no_ssh(tiny, hosts, tmp_path, reference):
    """`launch/multi_node_hostfile.sh` with NO_SSH=1 on each host: `deepspeed --hostfile --no_ssh --node_rank`."""
    (tmp_path / "hostfile").write_text("hosta slots=1\nhostb slots=1\n")
    run_on_two_hosts(hosts, write_config(tiny, tmp_path), tmp_path, "launch/multi_node_hostfile.sh",
                     NO_SSH=1, HOSTFILE=tmp_path / "hostfile")
    assert_matches_reference(tmp_path / "out", reference)


# ------------------------------------------------------------------------------------------------------ Slurm


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = slurm_skip_reason()
    if reason:
        print(f"SKIP Slurm: {reason}")
        pytest.skip(reason)
    with SlurmCluster(tmp_path_factory.mktemp("slurm"), nodes=2, cpus=2) as cluster:
        yield cluster


def slurm_env(**knobs) -> dict:
    env = launch_env(GPUS_PER_NODE=1, MASTER_ADDR_FROM="nodeaddr", **knobs)
    env.pop("MASTER_PORT")  # the script derives it from the job id
    return env


def test_slurm_pre_timeout_signal_checkpoints_requeues_and_resumes(tiny, slurm, tmp_path, reference):
    """The real `train.sbatch` on 2 Slurm nodes (torchrun per node): SIGUSR1 to the batch shell, as
    `--signal=B:USR1@120` sends it before the time limit -> ranks checkpoint and exit 75 -> the script requeues
    the job -> the rerun resumes by itself and finishes like the uninterrupted run."""
    cfg, out, log = write_config(tiny, tmp_path), tmp_path / "out", tmp_path / "job.out"
    job = slurm.sbatch(["--nodes=2", "--time=10", f"--output={log}", "launch/slurm/train.sbatch", str(cfg)],
                       env=slurm_env(), cwd=REPO)
    deadline = time.monotonic() + 240
    while max(metrics(out), default=0) < 2:
        assert time.monotonic() < deadline, f"no step 2 after 240 s: {slurm.job(job)}\n{read(log)[-3000:]}"
        time.sleep(0.2)
    slurm.signal_batch(job, "USR1")  # what slurmctld does at --signal=B:USR1@T
    info = slurm.wait_job(job, timeout=300)
    text = read(log)
    assert info["JobState"] == "COMPLETED" and info.get("Restarts") == "1", (info, text[-3000:])
    assert "[sbatch] received SIGUSR1" in text and re.search(r"SIGUSR1 to 1 rank\(s\)", text)
    saved = int(re.search(r"preempted \(SIGUSR1 received\): saved step-(\d+)", text)[1])
    # 75, or the status of a task srun stopped after another's 75 (--kill-on-bad-exit): requeued either way
    assert re.search(r"\[sbatch\] training step exited with \d+", text) and f"requeueing job {job}" in text
    assert re.search(rf"job {job} restart 1 on n1 n2", text)
    assert f"resumed from {out}/step-{saved:06d} at step {saved}" in text
    assert_matches_reference(out, reference)


def test_slurm_srun_tasks_signalled_while_starting_stop_after_the_first_step(tiny, slurm, tmp_path, reference):
    """LAUNCHER=srun: each Slurm task is a rank and reads SLURM_PROCID/NTASKS/LOCALID. SIGUSR1 arrives as soon as
    the batch script runs, before any rank can handle it: it is kept, delivered once the ranks are ready, and
    the job stops after step 1, requeues and finishes like the uninterrupted run."""
    cfg, out, log = write_config(tiny, tmp_path), tmp_path / "out", tmp_path / "job.out"
    job = slurm.sbatch(["--nodes=2", "--ntasks-per-node=1", "--time=10", f"--output={log}",
                        "launch/slurm/train.sbatch", str(cfg)], env=slurm_env(LAUNCHER="srun"), cwd=REPO)
    deadline = time.monotonic() + 120
    while "[sbatch] job" not in read(log):
        assert time.monotonic() < deadline, f"job not started after 120 s: {slurm.job(job)}"
        time.sleep(0.1)
    slurm.signal_batch(job, "USR1")
    info = slurm.wait_job(job, timeout=300)
    text = read(log)
    assert info["JobState"] == "COMPLETED" and info.get("Restarts") == "1", (info, text[-3000:])
    assert re.search(r"rank 0/2 \(local rank 0\) .*started by slurm", text)
    assert re.search(r"rank 1/2 \(local rank 0\) .*started by slurm", text)
    assert "[sbatch] received SIGUSR1" in text
    assert len(re.findall(r"\[signal_ranks\] .* node \d: SIGUSR1 to 1 rank\(s\)", text)) == 2, text[-3000:]
    assert "preempted (SIGUSR1 received): saved step-000001 at step 1, exit 75" in text
    assert f"resumed from {out}/step-000001 at step 1" in text
    assert_matches_reference(out, reference)


def test_slurm_time_limit_fires_the_pre_timeout_signal(tiny, slurm, tmp_path):
    """Nobody signals this job: Slurm itself sends SIGUSR1 before the time limit. `--time=1 --signal=B:USR1@30`
    makes slurmctld fire at its first time-limit check (every 30 s), while the job starts or trains (300 steps
    would take minutes). The ranks checkpoint, the job requeues, and the rerun resumes from that checkpoint.
    Then `scancel` (SIGTERM) must end the job for good: cancelled, not requeued."""
    cfg, out, log = write_config(tiny, tmp_path, steps=300), tmp_path / "out", tmp_path / "job.out"
    job = slurm.sbatch(["--nodes=2", "--time=1", "--signal=B:USR1@30", f"--output={log}",
                        "launch/slurm/train.sbatch", str(cfg)], env=slurm_env(), cwd=REPO)
    deadline = time.monotonic() + 240
    try:
        while not re.search(r"resumed from .* at step \d+", read(log)):
            assert time.monotonic() < deadline, f"no resume after 240 s: {slurm.job(job)}\n{read(log)[-3000:]}"
            time.sleep(0.5)
    finally:
        slurm.cancel(job)
        # its processes are gone before the next test or the cluster stops; the ranks checkpoint on the SIGTERM
        # first, which takes longer on a loaded machine
        info = slurm.wait_job(job, timeout=180)
    time.sleep(5)  # a requeue would show within the scheduler's 2 s passes
    text = read(log)
    assert info["JobState"] == "CANCELLED" and slurm.job(job).get("JobState") == "CANCELLED", (info, text[-2000:])
    assert "[sbatch] stopped by SIGTERM (reason: None); not requeueing" in text
    first_run = text.split(f"job {job} restart 1 on")[0]
    assert "[sbatch] received SIGUSR1" in first_run, text[-3000:]
    saved = int(re.search(r"preempted \(SIGUSR1 received\): saved step-(\d+)", first_run)[1])
    assert f"requeueing job {job}" in first_run
    assert f"resumed from {out}/step-{saved:06d} at step {saved}" in text
    assert sorted(losses(out))[:saved] == list(range(1, saved + 1))


def test_slurm_deepspeed_launcher_per_node(tiny, slurm, tmp_path, reference):
    """LAUNCHER=deepspeed: one task per node runs `deepspeed --hostfile --no_ssh --node_rank $SLURM_NODEID`."""
    cfg, out, log = write_config(tiny, tmp_path), tmp_path / "out", tmp_path / "job.out"
    job = slurm.sbatch(["--nodes=2", "--time=10", f"--output={log}", "launch/slurm/train.sbatch", str(cfg)],
                       env=slurm_env(LAUNCHER="deepspeed"), cwd=REPO)
    info = slurm.wait_job(job, timeout=300)
    text = read(log)
    assert info["JobState"] == "COMPLETED" and info.get("Restarts") == "0", (info, text[-3000:])
    assert "nnodes=2, num_local_procs=1, node_rank=0" in text and "nnodes=2, num_local_procs=1, node_rank=1" in text
    assert re.search(r"rank 1/2 \(local rank 0\) .*started by torch", text)
    assert not list(REPO.glob(f".hostfile-{job}"))  # the script's hostfile does not outlive the job
    assert_matches_reference(out, reference)
