"""Entry points of the trainer: `python -m ds_vicuna.train` (any launcher) and `ds-vicuna train`.

    deepspeed --num_gpus 8 --module ds_vicuna.train configs/vicuna_7b.yaml --data.train_path data/train.json
    ds-vicuna train demo --ranks 2 --data.train_path data/train.jsonl   # the deepspeed launcher, 2 local ranks
    ds-vicuna train CONFIG.yaml --ranks 2 --master-port 29600            # a named rendezvous port

Exit codes: 0 done (also after `train.stop_after_steps`), 2 a config/checkpoint error (the message names the
field or file), 75 stopped by SIGTERM/SIGUSR1/SIGINT after writing a checkpoint (the same command with
`--resume auto` continues). `--ranks N` forwards those signals to every rank (ds_vicuna/train/local_launch.py).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ds_vicuna.train.checkpoint import CheckpointError
from ds_vicuna.config import ConfigError, load_config
from ds_vicuna.train.launch_env import detect_launch_env, shutdown_distributed
from ds_vicuna.train.local_launch import EXIT_STATUS_FILE_ENV, LaunchError, launch_local
from ds_vicuna.train.preemption import PreemptionGuard


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


def register(subparsers) -> None:
    """`ds-vicuna train [CONFIG] [--ranks N] [--key value ...]`."""
    # "+" as the option prefix: every `--section.key value` reaches the config parser untouched.
    parser = subparsers.add_parser(
        "train", prefix_chars="+", add_help=False,
        help="fine-tune with DeepSpeed (one process; --ranks N starts the deepspeed launcher)",
        description="ds-vicuna train [CONFIG.yaml | demo] [--ranks N [--master-port P]] [--overwrite] "
                    "[--section.key value ...]\n\n"
                    "One process by default; --ranks N runs `deepspeed --num_gpus N --master_port P --module "
                    "ds_vicuna.train CONFIG ...` on this machine with a free port P (multi-node: see launch/), and "
                    "forwards SIGTERM/SIGUSR1/SIGINT to every rank (they checkpoint and exit 75).\n"
                    "CONFIG is a YAML file or a bundled example (demo, vicuna_7b, vicuna_13b_16k); "
                    "train.deepspeed is a JSON file or a bundled name (zero2, zero3, zero3_offload).\n"
                    "An output folder that already holds a run needs --resume auto (continue) or --overwrite.\n"
                    "Keys: see ds_vicuna/config.py.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("argv", nargs="*", help="CONFIG.yaml then --key value overrides")
    parser.set_defaults(func=_run_cli, train_parser=parser)


def pop_option(argv: list[str], *names: str) -> str | None:
    """Remove `--name VALUE` or `--name=VALUE` (any of `names`) from argv; returns VALUE or None.

    Raises:
        ConfigError: the option has no value.
    """
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name:
                if i + 1 >= len(argv):
                    raise ConfigError(f"{name} needs a value")
                value = argv[i + 1]
                del argv[i:i + 2]
                return value
            if arg.startswith(name + "="):
                del argv[i]
                return arg.split("=", 1)[1]
    return None


def _int_option(value: str | None, name: str, default: int | None) -> int | None:
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(f"{name} expects a whole number, got {value!r}") from None
    if number <= 0:
        raise ConfigError(f"{name} must be > 0, got {number}")
    return number


def _run_cli(args) -> int:
    argv = list(args.argv)
    if "-h" in argv or "--help" in argv:
        args.train_parser.print_help()
        return 0
    config = argv.pop(0) if argv and not argv[0].startswith("-") else None
    try:
        ranks = _int_option(pop_option(argv, "--ranks"), "--ranks", 1)
        port = _int_option(pop_option(argv, "--master-port", "--master_port"), "--master-port", None)
        if ranks > 1 and detect_launch_env().world_size == 1:
            load_config(config, argv)  # a bad config fails here, once, not on every rank
            return launch_local(config, argv, ranks, port)
    except (ConfigError, LaunchError) as err:
        print(f"ds-vicuna train: error: {err}", file=sys.stderr, flush=True)
        return 2
    return main(([config] if config else []) + argv)


if __name__ == "__main__":
    sys.exit(main())
