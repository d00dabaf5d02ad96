"""Rank/world/master from the deepspeed launcher, torchrun, srun or nothing; preemption flag."""
import os
import signal

import pytest

from ds_vicuna.train.launch_env import (Launcher, detect_launch_env, export_torch_env, first_slurm_host, free_port,
                                  release_shm_allreduce_buffer)
from ds_vicuna.train.preemption import REQUEUE_EXIT_CODE, PreemptionGuard


def test_torch_variables_win():
    env = detect_launch_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1",
                             "MASTER_PORT": "1234", "SLURM_PROCID": "9", "SLURM_NTASKS": "16"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port, env.launcher) == \
        (3, 8, 1, "n1", 1234, Launcher.TORCH)


def test_slurm_is_translated():
    env = detect_launch_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                             "SLURM_JOB_NODELIST": "gpu[03-05,9]", "SLURM_JOB_ID": "123456"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.launcher) == \
        (5, 8, 1, "gpu03", Launcher.SLURM)
    target = {}
    export_torch_env(env, target)
    assert target == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu03",
                      "MASTER_PORT": str(env.master_port)}
    again = detect_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_NODELIST": "gpu[03-05,9]",
                               "SLURM_JOB_ID": "123456"})
    assert again.master_port == env.master_port  # every rank of the job agrees


@pytest.mark.parametrize("nodelist,host", [("node7", "node7"), ("a[1-3]", "a1"), ("gpu[03-05,9],cpu1", "gpu03"),
                                           ("x[12,15]", "x12")])
def test_first_slurm_host(nodelist, host):
    assert first_slurm_host(nodelist) == host


def test_plain_python_is_one_process():
    env = detect_launch_env({})
    assert (env.rank, env.world_size, env.local_rank, env.launcher, env.is_main) == (0, 1, 0, Launcher.SINGLE, True)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_signal_only_sets_the_flag(sig):
    before = signal.getsignal(sig)
    with PreemptionGuard() as guard:
        assert not guard.should_stop()
        os.kill(os.getpid(), sig)
        assert guard.requested and guard.received == sig and guard.should_stop()
        assert guard.agreed_signal == sig and sig.name in guard.stop_reason()
    assert signal.getsignal(sig) == before
    assert REQUEUE_EXIT_CODE == 75


def test_stop_requested_from_code_is_not_a_signal():
    with PreemptionGuard() as guard:
        guard.request()
        assert guard.should_stop() and guard.agreed_signal is None and guard.stop_reason() == "stop requested"


def _rank_sees_stop(rank: int, port: int, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    with PreemptionGuard() as guard:
        first = guard.should_stop()
        if rank == 1:
            os.kill(os.getpid(), signal.SIGUSR1)  # only rank 1 is signalled
        results.put((rank, first, guard.should_stop(), guard.agreed_signal))
    dist.destroy_process_group()


def test_a_signal_on_one_rank_stops_every_rank_with_the_same_reason():
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_rank_sees_stop, args=(rank, port, results)) for rank in (0, 1)]
    for proc in procs:
        proc.start()
    got = sorted(results.get(timeout=120) for _ in procs)
    for proc in procs:
        proc.join(timeout=30)
    assert got == [(0, False, True, signal.SIGUSR1), (1, False, True, signal.SIGUSR1)]


def test_launch_scripts_signal_only_processes_that_handle_the_signal():
    """`dsv_catches` (launch/_common.sh) reads the SigCgt mask: a rank still starting has no handler yet and must
    not be sent SIGUSR1 (its default action would kill it)."""
    import subprocess
    import sys
    from pathlib import Path

    common = Path(__file__).resolve().parents[2] / "launch" / "_common.sh"
    ready = subprocess.Popen([sys.executable, "-c", "import signal, sys, time\n"
                              "signal.signal(signal.SIGUSR1, lambda *a: None); print('ok', flush=True); "
                              "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    starting = subprocess.Popen(["sleep", "60"])
    try:
        assert ready.stdout.readline().strip() == "ok"
        probe = subprocess.run(["bash", "-c", f". {common}; for p in {ready.pid} {starting.pid}; do "
                                "for s in USR1 TERM; do dsv_catches $p $s && echo $p:$s; done; done"],
                               capture_output=True, text=True, timeout=30)
        assert probe.stdout.split() == [f"{ready.pid}:USR1"], probe
    finally:
        ready.kill()
        starting.kill()


@pytest.mark.parametrize("script,env,message", [
    ("launch/single_node.sh", {}, "usage: launch/single_node.sh CONFIG.yaml"),
    ("launch/torchrun_multi_node.sh", {}, "usage: launch/torchrun_multi_node.sh CONFIG.yaml"),
    ("launch/multi_node_hostfile.sh", {"HOSTFILE": "/nonexistent/hostfile"},
     "hostfile '/nonexistent/hostfile' not found (set HOSTFILE)"),
])
def test_launch_scripts_reject_bad_input_with_exit_2(script, env, message):
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    args = ["configs/demo.yaml"] if "HOSTFILE" in env else []
    proc = subprocess.run([script, *args], cwd=repo, env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 2 and message in proc.stderr, proc


def test_cpu_shm_allreduce_buffer_name_is_released(tmp_path, monkeypatch):
    import os

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29611")
    launch = detect_launch_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    mine = tmp_path / f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_29611_1"
    peer = tmp_path / f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_29611_0"
    mine.write_bytes(b"x")
    peer.write_bytes(b"x")
    assert release_shm_allreduce_buffer(launch, shm_dir=str(tmp_path)) is True
    assert not mine.exists() and peer.exists()  # each rank releases its own
    assert release_shm_allreduce_buffer(launch, shm_dir=str(tmp_path)) is False
