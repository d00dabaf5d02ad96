"""Stop cleanly when the scheduler asks: save a checkpoint at a step boundary, exit with REQUEUE_EXIT_CODE.

    guard = PreemptionGuard()          # installs SIGTERM + SIGUSR1 handlers (they only set a flag)
    for step in ...:
        engine.step()
        if guard.should_stop():        # collective: every rank calls it once per optimizer step
            save_checkpoint(...); sys.exit(REQUEUE_EXIT_CODE)

Slurm sends SIGUSR1 (`#SBATCH --signal=USR1@120`) or SIGTERM before killing a job. Only some ranks may
receive it, so `should_stop` all-reduces the flag with MAX: all ranks stop after the same step and write one
consistent checkpoint. A wrapper that sees exit code 75 (EX_TEMPFAIL) requeues the job, which resumes with
`--resume auto`.
"""
from __future__ import annotations

import signal
from types import FrameType

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionGuard:
    """Turns SIGTERM/SIGUSR1 into a flag that all ranks agree on at the next optimizer step.

    Args:
        signals: which signals request a stop.
        install: install the handlers now (the previous ones are restored by `uninstall`).
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS, install: bool = True):
        self.signals = signals
        self.requested = False
        self.received: signal.Signals | None = None  # the signal this process got
        self.agreed_signal: signal.Signals | None = None  # the signal any rank got (set by should_stop)
        self._previous: dict = {}
        if install:
            self.install()

    def install(self) -> None:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Only set a flag: the training step in flight finishes, then every rank stops together.
        self.requested = True
        self.received = signal.Signals(signum)

    def request(self) -> None:
        """Ask for a stop from code (e.g. `train.stop_after_steps`), as a signal would."""
        self.requested = True

    def should_stop(self) -> bool:
        """True on every rank when any rank was asked to stop. Collective when torch.distributed is running.

        Also sets `agreed_signal` on every rank to the signal some rank received (None for a stop requested
        from code), so all ranks choose the same exit status.
        """
        import torch
        import torch.distributed as dist

        # 0: carry on; 1: stop requested from code; 1 + signum: a signal arrived (MAX prefers signals)
        code = 1 + int(self.received) if self.received is not None else int(self.requested)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            flag = torch.tensor([code], dtype=torch.int32, device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            code = int(flag.item())
        if code > 1:
            self.agreed_signal = signal.Signals(code - 1)
        return code > 0

    def stop_reason(self) -> str:
        """Why training stopped, for logs: "SIGUSR1 received" or "stop requested"."""
        if self.agreed_signal is not None:
            return f"{self.agreed_signal.name} received"
        return "stop requested" if self.requested else "no stop"

    def __enter__(self) -> "PreemptionGuard":
        return self

    def __exit__(self, *exc) -> None:
        self.uninstall()
