"""`ds-vicuna` command line: one subcommand per product stage.

    ds-vicuna data clean|split|stats ...   conversations -> clean, split training data
    ds-vicuna train CONFIG.yaml [--key value ...]
    ds-vicuna export CKPT OUT
    ds-vicuna serve all|controller|worker|api ...
    ds-vicuna chat ...
    ds-vicuna eval run|answer|judge|summarize|rate|plot ...

Each stage module exposes `register(subparsers)`, which adds its parser and sets `func(args) -> int`.
Modules are imported only when listed here, and import their heavy dependencies (torch, deepspeed) lazily.
"""
from __future__ import annotations

import argparse
import importlib
import sys

STAGE_MODULES = (
    "ds_vicuna.data.cli",
    "ds_vicuna.train.cli",
    "ds_vicuna.train.export",
    "ds_vicuna.serve.cli",
    "ds_vicuna.eval.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ds-vicuna", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in STAGE_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
