"""Who am I in the job: rank, local rank, world size and rendezvous address, from whichever launcher started us.

    deepspeed --num_gpus 2 --module ds_vicuna.train cfg.yaml   # sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_*
    torchrun --nproc_per_node 2 -m ds_vicuna.train cfg.yaml     # same variables
    srun python -m ds_vicuna.train cfg.yaml                     # only SLURM_*: translated here
    python -m ds_vicuna.train cfg.yaml                          # nothing set: one process, rank 0 of 1

DeepSpeed 0.19 does not translate Slurm's variables itself, so `export_torch_env()` writes the torch names
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) before `deepspeed.init_distributed()` reads them.
"""
from __future__ import annotations

import enum
import os
import re
import socket
from dataclasses import dataclass
from typing import Mapping

DEFAULT_MASTER_PORT = 29500
DIST_TIMEOUT_ENV = "DS_VICUNA_DIST_TIMEOUT_S"
DEFAULT_DIST_TIMEOUT_S = 600  # collective timeout; a dead peer fails the job after this, never hangs it


class Launcher(str, enum.Enum):
    """What started this process."""

    TORCH = "torch"  # deepspeed launcher, torchrun, or anything exporting RANK/WORLD_SIZE
    SLURM = "slurm"  # srun: SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID
    SINGLE = "single"  # plain python


@dataclass(frozen=True)
class LaunchEnv:
    """This process's place in the job."""

    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    launcher: Launcher

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints, logs and writes shared files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list: "gpu[03-05,9],cpu1" -> "gpu03" (what `scontrol show hostnames` gives)."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ValueError(f"cannot read SLURM node list {nodelist!r}")
    prefix, ranges = match.groups()
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def slurm_master_port(job_id: str | None) -> int:
    """A port derived from the job id, so the ranks of one job agree and two jobs on a node rarely clash."""
    if not job_id or not job_id.isdigit():
        return DEFAULT_MASTER_PORT
    return 15000 + int(job_id) % 20000


def detect_launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """Read rank/world/master from the environment (torch names first, then Slurm, else one process).

    Args:
        environ: the variables to read; `os.environ` by default.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(rank=int(env["RANK"]), local_rank=int(env.get("LOCAL_RANK", 0)),
                         world_size=int(env["WORLD_SIZE"]), master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                         master_port=int(env.get("MASTER_PORT", DEFAULT_MASTER_PORT)), launcher=Launcher.TORCH)
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        addr = env.get("MASTER_ADDR") or (first_slurm_host(nodelist) if nodelist else "127.0.0.1")
        port = int(env.get("MASTER_PORT") or slurm_master_port(env.get("SLURM_JOB_ID")))
        return LaunchEnv(rank=int(env["SLURM_PROCID"]), local_rank=int(env.get("SLURM_LOCALID", 0)),
                         world_size=int(env["SLURM_NTASKS"]), master_addr=addr, master_port=port,
                         launcher=Launcher.SLURM)
    return LaunchEnv(rank=0, local_rank=0, world_size=1, master_addr="127.0.0.1",
                     master_port=int(env.get("MASTER_PORT") or free_port()), launcher=Launcher.SINGLE)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for single-process runs)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def export_torch_env(launch: LaunchEnv, environ: dict | None = None) -> None:
    """Write RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT for torch.distributed's env:// init."""
    env = os.environ if environ is None else environ
    env.update({"RANK": str(launch.rank), "LOCAL_RANK": str(launch.local_rank),
                "WORLD_SIZE": str(launch.world_size), "MASTER_ADDR": launch.master_addr,
                "MASTER_PORT": str(launch.master_port)})


def init_distributed(launch: LaunchEnv | None = None) -> LaunchEnv:
    """Set the torch variables and start torch.distributed through DeepSpeed (gloo on CPU, nccl on CUDA).

    Safe to call twice. Returns the LaunchEnv used.
    """
    import deepspeed
    import torch

    import datetime

    launch = launch or detect_launch_env()
    export_torch_env(launch)
    # A finite collective timeout: a rank killed mid-step makes the others fail after this long instead of
    # hanging the job (the launcher then exits and a supervisor restarts it from the last checkpoint).
    timeout = datetime.timedelta(seconds=float(os.environ.get(DIST_TIMEOUT_ENV, DEFAULT_DIST_TIMEOUT_S)))
    if torch.cuda.is_available():
        torch.cuda.set_device(launch.local_rank)
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                   rank=launch.rank, world_size=launch.world_size, timeout=timeout)
        if not torch.cuda.is_available() and launch.world_size > 1:
            torch.distributed.barrier()  # every rank has mapped every peer's buffer (DeepSpeed's shm_initialize)
            release_shm_allreduce_buffer(launch)
    return launch


def release_shm_allreduce_buffer(launch: LaunchEnv, shm_dir: str = "/dev/shm") -> bool:
    """Unlink the name of this rank's DeepSpeed CPU shared-memory all-reduce buffer once all ranks have mapped it.

    DeepSpeed 0.19's CPU communication (csrc/cpu/comm/shm.cpp) creates
    `deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>` (66 MiB) and never unlinks it, so every
    multi-rank CPU run, finished or killed, left that much RAM behind in /dev/shm. The mappings stay valid after
    the unlink; the memory goes back when the process exits, however it exits.

    Returns:
        Whether a buffer was there to release.
    """
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{launch.rank}")
    try:
        os.unlink(os.path.join(shm_dir, name))
    except FileNotFoundError:
        return False
    return True


def shutdown_distributed() -> None:
    """Leave the process group together (barrier, then destroy) so no rank exits while a peer still talks to it.

    Call on the success path only: after an error a barrier would wait for the collective timeout.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
