"""One optimizer step on fixed samples; dumps the step's loss and full gradients (rank 0) for comparison.

    python tests/support/scripts/grad_check.py CONFIG OUT.pt 4x1 1x4   # one process: micro 4 x GAS 1, micro 1 x GAS 4
    deepspeed --num_gpus 2 tests/support/scripts/grad_check.py CONFIG OUT.pt 1x2   # 2 ranks x micro 1 x GAS 2
    python tests/support/scripts/grad_check.py CONFIG OUT.pt 4x1 4x1:loss_chunk_tokens=null,gradient_checkpointing=false
    deepspeed --num_gpus 2 tests/support/scripts/grad_check.py CONFIG OUT.pt 2x1:sequence_parallel_size=2

Every variant covers the same 4 samples (of different lengths) in one optimizer step; with `batching: pack` they
are packed two per row. `:key=value,...` after a variant adds config overrides for it (results are keyed by the
whole variant string); a variant that turns on sequence parallelism must be the only one of its process (its
groups are built once).
"""
import os
import sys

import torch
from deepspeed.utils import safe_get_full_grad

from ds_vicuna.config import load_config
from ds_vicuna.train.launch_env import init_distributed, shutdown_distributed
from ds_vicuna.train.loop import make_batch, optimizer_step, preflight, setup
from ds_vicuna.train.cli import quiet_library_warnings

SAMPLES = [0, 1, 2, 3]
PACKED_ROWS = [[0, 1], [2, 3]]


def parse_variant(variant: str) -> tuple[int, int, list[str]]:
    """"4x1" or "4x1:key=value,key=value" -> (micro, gas, ["--key", "value", ...])."""
    shape, _, extra = variant.partition(":")
    micro, gas = map(int, shape.split("x"))
    overrides = []
    for pair in filter(None, extra.split(",")):
        key, value = pair.split("=", 1)
        overrides += [f"--{key}", value]
    return micro, gas, overrides


def run_variant(config_path: str, launch, micro: int, gas: int, overrides: list[str]) -> dict:
    replicas = load_config(config_path, overrides).data_parallel_size(launch.world_size)
    cfg = load_config(config_path, ["--micro_batch_size", str(micro),
                                    "--global_batch_size", str(micro * gas * replicas), *overrides])
    run = setup(cfg, preflight(cfg), launch)
    units = PACKED_ROWS if cfg.data.batching == "pack" else SAMPLES  # rows of a packed micro-batch, or samples
    per_rank = len(units) // run.dp_size
    mine = units[run.dp_rank * per_rank:(run.dp_rank + 1) * per_rank]
    batches = [make_batch(run, run.train_data, mine[i:i + micro]) for i in range(0, len(mine), micro)]
    assert len(batches) == gas
    grads = {}

    def read_grads(engine):
        for name, param in engine.module.named_parameters():
            grads[name] = safe_get_full_grad(param).detach().clone().float()

    loss, tokens = optimizer_step(run, batches, before_update=read_grads)
    return {"loss": loss, "tokens": tokens, "grads": grads}


def main() -> None:
    quiet_library_warnings()
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
    config_path, out, variants = args[0], args[1], args[2:]
    launch = init_distributed()
    results = {}
    for variant in variants:
        results[variant] = run_variant(config_path, launch, *parse_variant(variant))
    if launch.rank == 0:
        torch.save(results, out)
    shutdown_distributed()  # leave together: a rank exiting while gloo still talks to it aborts ("terminate called")


if __name__ == "__main__":
    main()
    # as train_and_dump.py: skip the native teardown, where a finished rank sometimes aborted ("terminate called")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
