"""Real clusters on one machine for launch tests: a Slurm controller with virtual nodes, and simulated hosts.

    with SlurmCluster(tmp_path / "slurm", nodes=2, cpus=2) as slurm:   # munged + slurmctld + 2 slurmd
        job = slurm.sbatch(["launch/slurm/train.sbatch", "cfg.json"], env=...)
    with NetnsPair("dsv") as hosts:                                   # 2 network namespaces + veth pair
        hosts.popen(0, ["launch/torchrun_multi_node.sh", ...], env=...)

Everything lives in a private folder (config, munge key/socket, state, logs, pid files), on free loopback ports, so
it neither needs nor touches a system Slurm; every daemon is stopped by pid at exit. The namespaces get addresses
only inside themselves (no route out). `skip_reason()` says why a box cannot run them (tests print it and skip).
Needs root and Debian's packages: apt-get install -y --no-install-recommends slurm-wlm munge
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from ds_vicuna.train.launch_env import free_port  # noqa: F401  (tests import it from here too)

SLURM_PACKAGES = ("slurm-wlm", "munge")
SLURM_BINARIES = ("slurmctld", "slurmd", "munged", "mungekey", "sbatch", "scontrol", "squeue")



def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=kwargs.pop("timeout", 60),
                          **kwargs)


def _stop_pid(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM, wait, then SIGKILL one process we started."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def slurm_skip_reason(install: bool = True) -> str | None:
    """None if Slurm can run here (installing Debian's packages as root when missing), else why not."""
    if os.geteuid() != 0:
        return "Slurm test needs root (slurmd/slurmctld run as root here)"
    missing = [b for b in SLURM_BINARIES if not (shutil.which(b) or Path("/usr/sbin", b).exists())]
    if missing and install and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        try:
            subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=300, check=True)
            subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *SLURM_PACKAGES],
                           env=env, capture_output=True, timeout=600, check=True)
        except (subprocess.SubprocessError, OSError) as err:
            return f"could not apt-get install {' '.join(SLURM_PACKAGES)}: {err}"
        missing = [b for b in SLURM_BINARIES if not (shutil.which(b) or Path("/usr/sbin", b).exists())]
    if missing:
        return f"Slurm binaries missing ({', '.join(missing)}): apt-get install {' '.join(SLURM_PACKAGES)}"
    return None


class _Service:
    """`with X(...) as x:` runs start(), and stop() on exit or when start() fails halfway."""

    def start(self):
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


class SlurmCluster(_Service):
    """munged + slurmctld + N slurmd (virtual nodes n1..nN on 127.0.0.1) in a private folder.

    Fast-requeue settings: a requeued job may start again after ~5-10 s (cred_expire=5, 2 s scheduler passes).
    """

    def __init__(self, root: Path, nodes: int = 2, cpus: int = 2):
        self.root, self.nodes, self.cpus = Path(root), nodes, cpus
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._pid_files: list[Path] = []

    def _write_conf(self) -> None:
        root, host = self.root, socket.gethostname().split(".")[0]
        for sub in ("state", "log", *(f"spool/n{i}" for i in range(1, self.nodes + 1))):
            (root / sub).mkdir(parents=True, exist_ok=True)
        lines = [
            "ClusterName=dsvci", f"SlurmctldHost={host}(127.0.0.1)", f"SlurmctldPort={free_port()}",
            "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge", "CredType=cred/munge",
            # a requeued job waits cred_expire seconds before it may run again (default 120)
            f"AuthInfo=socket={root}/munge.sock,cred_expire=5",
            f"StateSaveLocation={root}/state", f"SlurmdSpoolDir={root}/spool/%n",
            f"SlurmctldPidFile={root}/slurmctld.pid", f"SlurmdPidFile={root}/slurmd-%n.pid",
            f"SlurmctldLogFile={root}/log/slurmctld.log", f"SlurmdLogFile={root}/log/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SwitchType=switch/none",
            "MpiDefault=none", "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none", "JobCompType=jobcomp/none",
            "SchedulerType=sched/backfill", "SchedulerParameters=sched_interval=2,bf_interval=2",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "ReturnToService=2",
            # believe the CPU counts below even when the box has fewer cores
            "SlurmdParameters=config_overrides", "SlurmctldTimeout=30", "SlurmdTimeout=30",
            "MessageTimeout=10",
            # SIGTERM -> SIGKILL grace on cancel/timeout: ranks finish their step and checkpoint first
            "KillWait=30", "InactiveLimit=0", "MinJobAge=300",
        ]
        for i in range(1, self.nodes + 1):
            # several slurmd on one host: a distinct Port each and `slurmd -N nX` (Debian builds MULTIPLE_SLURMD)
            lines.append(f"NodeName=n{i} NodeHostname={host} NodeAddr=127.0.0.1 Port={free_port()} "
                         f"CPUs={self.cpus} RealMemory=2000 State=UNKNOWN")
        lines.append("PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self) -> "SlurmCluster":
        """Start munged, slurmctld and the slurmd daemons; wait until every node is idle."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._write_conf()
        key = self.root / "munge.key"
        _run(["mungekey", "--create", f"--keyfile={key}"])
        self._pid_files.append(self.root / "munged.pid")
        _run(["munged", "--force", f"--socket={self.root}/munge.sock", f"--key-file={key}",
              f"--pid-file={self.root}/munged.pid", f"--log-file={self.root}/log/munged.log",
              f"--seed-file={self.root}/munged.seed"])
        self._pid_files.append(self.root / "slurmctld.pid")
        _run(["slurmctld", "-c"], env=self.env)
        for i in range(1, self.nodes + 1):
            self._pid_files.append(self.root / f"slurmd-n{i}.pid")
            _run(["slurmd", "-N", f"n{i}"], env=self.env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            idle = subprocess.run(["sinfo", "-h", "-N", "-t", "idle", "-o", "%N"], env=self.env,
                                  capture_output=True, text=True, timeout=30).stdout.split()
            if len(idle) == self.nodes:
                return self
            time.sleep(0.3)
        raise RuntimeError(f"Slurm nodes not idle after 60 s; logs in {self.root / 'log'}")

    def stop(self) -> None:
        """Cancel jobs, then stop the daemons by pid (newest first)."""
        subprocess.run(["scancel", "--full", "-u", "root"], env=self.env, capture_output=True, timeout=30)
        for pid_file in reversed(self._pid_files):
            if pid_file.is_file() and pid_file.read_text().strip():
                _stop_pid(int(pid_file.read_text().strip()))
        self._pid_files.clear()

    def sbatch(self, args: list[str], env: dict, cwd: Path) -> int:
        """Submit a batch job; returns its id."""
        out = _run(["sbatch", "--parsable", *args], env={**self.env, **env}, cwd=cwd).stdout
        return int(out.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...); {} once the job is forgotten."""
        out = subprocess.run(["scontrol", "-o", "show", "job", str(job_id)], env=self.env, capture_output=True,
                             text=True, timeout=30).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_job(self, job_id: int, timeout: float, done=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                         "NODE_FAIL", "OUT_OF_MEMORY")) -> dict[str, str]:
        """Poll until the job reaches a final state; raise TimeoutError with its state otherwise."""
        deadline, info = time.monotonic() + timeout, {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in done:
                return info
            time.sleep(1)
        raise TimeoutError(f"job {job_id} not finished after {timeout} s: {info.get('JobState')}")

    def cancel(self, job_id: int, tries: int = 5) -> None:
        """`scancel JOB`, retried while slurmctld refuses it (it can, while the job is being requeued)."""
        for _ in range(tries):
            done = subprocess.run(["scancel", str(job_id)], env=self.env, capture_output=True, text=True, timeout=30)
            if done.returncode == 0:
                return
            time.sleep(2)
        raise RuntimeError(f"scancel {job_id} failed {tries} times: {done.stderr.strip()}")

    def signal_batch(self, job_id: int, sig: str = "USR1") -> None:
        """What `--signal=B:USR1@T` does at T seconds before the limit: signal the batch shell only."""
        _run(["scancel", "--batch", f"--signal={sig}", str(job_id)], env=self.env)


def netns_skip_reason() -> str | None:
    """None if network namespaces and UTS namespaces can be created here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "unshare", "nsenter"):
        if not shutil.which(tool):
            return f"'{tool}' not found (iproute2 / util-linux)"
    probe = f"dsvprobe{os.getpid() % 100000}"
    try:
        _run(["ip", "netns", "add", probe])
        _run(["ip", "netns", "del", probe])
        _run(["unshare", "--uts", "true"])
    except (subprocess.SubprocessError, OSError) as err:
        detail = getattr(err, "stderr", "") or err
        return f"cannot create network/UTS namespaces here: {str(detail).strip()}"
    return None


class NetnsPair(_Service):
    """Two simulated hosts: namespaces <tag>a/<tag>b joined by a veth pair, 10.77.0.1 (hosta) / 10.77.0.2 (hostb).

    The addresses exist only inside the namespaces (no route out); each namespace has its own /etc/hosts naming
    hosta and hostb, and `popen` gives each process its own hostname (`unshare --uts`), which is how gloo picks
    the interface to talk on.
    """

    HOSTS = ("hosta", "hostb")
    ADDRS = ("10.77.0.1", "10.77.0.2")

    def __init__(self, tag: str = "dsv"):
        suffix = f"{tag}{os.getpid() % 100000}"
        self.names = (f"{suffix}a", f"{suffix}b")
        self.veths = (f"{suffix}va"[:15], f"{suffix}vb"[:15])

    def start(self) -> "NetnsPair":
        a, b = self.names
        _run(["ip", "netns", "add", a])
        _run(["ip", "netns", "add", b])
        _run(["ip", "link", "add", self.veths[0], "type", "veth", "peer", "name", self.veths[1]])
        hosts = "127.0.0.1 localhost\n" + "".join(f"{ip} {h}\n" for ip, h in zip(self.ADDRS, self.HOSTS))
        for ns, veth, addr in zip(self.names, self.veths, self.ADDRS):
            _run(["ip", "link", "set", veth, "netns", ns])
            _run(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", veth])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            _run(["ip", "-n", ns, "link", "set", veth, "up"])
            # `ip netns exec` bind-mounts /etc/netns/<ns>/hosts over /etc/hosts
            Path("/etc/netns", ns).mkdir(parents=True, exist_ok=True)
            Path("/etc/netns", ns, "hosts").write_text(hosts)
        return self

    def stop(self) -> None:
        """Delete both namespaces (their veth ends go with them) and their /etc/netns folders."""
        for ns in self.names:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
            shutil.rmtree(Path("/etc/netns", ns), ignore_errors=True)

    def popen(self, index: int, cmd: list[str], env: dict, **kwargs) -> subprocess.Popen:
        """Start `cmd` on simulated host `index` (its namespace, its own hostname), in a new session."""
        host = self.HOSTS[index]
        wrapped = ["ip", "netns", "exec", self.names[index], "unshare", "--uts", "sh", "-c",
                   f'hostname {host} && exec "$@"', "sh", *cmd]
        return subprocess.Popen(wrapped, env=env, start_new_session=True, **kwargs)
