"""Entry points of the trainer: `python -m ds_vicuna.train` (any launcher) and `ds-vicuna train`.

    deepspeed --num_gpus 8 --module ds_vicuna.train configs/vicuna_7b.yaml --data.train_path data/train.json
    ds-vicuna train configs/demo.yaml --ranks 2        # starts the deepspeed launcher for 2 local ranks

Exit codes: 0 done, 2 a config/checkpoint error (the message names the field or file), 75 preempted after a
checkpoint (restart with `--resume auto` to continue).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ds_vicuna.train.checkpoint import CheckpointError
from ds_vicuna.config import ConfigError, load_config
from ds_vicuna.train.launch_env import detect_launch_env, shutdown_distributed
from ds_vicuna.train.preemption import PreemptionGuard

EXIT_STATUS_FILE_ENV = "DS_VICUNA_EXIT_STATUS_FILE"


def split_argv(argv: list[str]) -> tuple[str | None, list[str]]:
    """`[CONFIG] [--key value ...]` -> (config path or None, overrides); drops the launcher's --local_rank."""
    argv = [a for a in argv if not a.startswith(("--local_rank", "--local-rank"))]
    if argv and not argv[0].startswith("-"):
        return argv[0], argv[1:]
    return None, argv


def quiet_library_warnings() -> None:
    """Drop per-step deprecation noise from torch.distributed (DeepSpeed calls the old collective names)."""
    import warnings

    warnings.filterwarnings("ignore", message=r".*is deprecated. Please use `torch.distributed", category=FutureWarning)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m ds_vicuna.train` / the deepspeed launcher. Returns the process exit code."""
    quiet_library_warnings()
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        from ds_vicuna.train import loop

        print(loop.__doc__)
        return 0
    # First thing, and until the process group is left: a SIGTERM/SIGUSR1 while torch, the model or the data
    # load, or while the preemption checkpoint is written, must not kill this rank.
    from ds_vicuna.train.loop import TrainError, train

    with PreemptionGuard() as guard:
        config, overrides = split_argv(argv)
        try:
            cfg = load_config(config, overrides)
            result = train(cfg, guard=guard)
        except (ConfigError, CheckpointError, TrainError) as err:
            print(f"ds-vicuna train: error: {err}", file=sys.stderr, flush=True)
            return 2
        shutdown_distributed()
    report_exit_status(result.exit_code)
    return result.exit_code


def report_exit_status(code: int) -> None:
    """Write a non-zero exit status to `$DS_VICUNA_EXIT_STATUS_FILE` (set by launch/ scripts): torchrun turns a
    rank's 75 ("checkpointed, restart me") into its own generic failure, so the script reads it here instead."""
    path = os.environ.get(EXIT_STATUS_FILE_ENV)
    if code and path:
        Path(path).write_text(f"{code}\n")


def launcher_command(config: str | None, overrides: list[str], ranks: int) -> list[str]:
    """The `deepspeed --num_gpus N --module ds_vicuna.train ...` command for N ranks on this machine."""
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--module",
            "ds_vicuna.train", *([config] if config else []), *overrides]


def register(subparsers) -> None:
    """`ds-vicuna train [CONFIG] [--ranks N] [--key value ...]`."""
    # "+" as the option prefix: every `--section.key value` reaches the config parser untouched.
    parser = subparsers.add_parser(
        "train", prefix_chars="+", add_help=False,
        help="fine-tune with DeepSpeed (one process; --ranks N starts the deepspeed launcher)",
        description="ds-vicuna train [CONFIG.yaml] [--ranks N] [--section.key value ...]\n\n"
                    "One process by default; --ranks N runs `deepspeed --num_gpus N --module ds_vicuna.train "
                    "CONFIG ...` on this machine (multi-node: see launch/). Keys: see ds_vicuna/config.py.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("argv", nargs="*", help="CONFIG.yaml then --key value overrides")
    parser.set_defaults(func=_run_cli, train_parser=parser)


def _run_cli(args) -> int:
    import subprocess

    argv = list(args.argv)
    if "-h" in argv or "--help" in argv:
        args.train_parser.print_help()
        return 0
    config = argv.pop(0) if argv and not argv[0].startswith("-") else None
    ranks = 1
    if "--ranks" in argv:
        at = argv.index("--ranks")
        ranks = int(argv[at + 1])
        del argv[at:at + 2]
    if ranks > 1 and detect_launch_env().world_size == 1:
        command = launcher_command(config, argv, ranks)
        print("[ds-vicuna] launching: " + " ".join(command), flush=True)
        return subprocess.call(command)
    return main(([config] if config else []) + argv)


if __name__ == "__main__":
    sys.exit(main())
