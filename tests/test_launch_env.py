"""Rank/world/master from the deepspeed launcher, torchrun, srun or nothing; preemption flag."""
import os
import signal

import pytest

from ds_vicuna.launch_env import Launcher, detect_launch_env, export_torch_env, first_slurm_host
from ds_vicuna.preemption import REQUEUE_EXIT_CODE, PreemptionGuard


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
    assert signal.getsignal(sig) == before
    assert REQUEUE_EXIT_CODE == 75
