"""One optimizer step on fixed samples; dumps the step's loss and full gradients (rank 0) for comparison.

    python tests/scripts/grad_check.py CONFIG OUT.pt 4x1 1x4      # one process: micro 4 x GAS 1, micro 1 x GAS 4
    deepspeed --num_gpus 2 tests/scripts/grad_check.py CONFIG OUT.pt 1x2   # 2 ranks x micro 1 x GAS 2
    deepspeed --num_gpus 2 tests/scripts/grad_check.py CONFIG OUT.pt 2x1 --sequence_parallel_size 2

Every variant covers the same 4 samples (of different lengths) in one optimizer step; with `batching: pack` they
are packed two per row. Trailing `--key value` pairs override the config (one variant per process when they
turn on sequence parallelism: its groups are built once).
"""
import sys

import torch
from deepspeed.utils import safe_get_full_grad

from ds_vicuna.config import load_config
from ds_vicuna.launch_env import init_distributed
from ds_vicuna.train import make_batch, optimizer_step, preflight, setup
from ds_vicuna.train_cli import quiet_library_warnings

SAMPLES = [0, 1, 2, 3]
PACKED_ROWS = [[0, 1], [2, 3]]


def run_variant(config_path: str, launch, micro: int, gas: int, overrides: list[str]) -> dict:
    probe = load_config(config_path, overrides)
    replicas = probe.data_parallel_size(launch.world_size)
    cfg = load_config(config_path, [*overrides, "--micro_batch_size", str(micro),
                                    "--global_batch_size", str(micro * gas * replicas)])
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
    config_path, out, rest = args[0], args[1], args[2:]
    at = next((i for i, a in enumerate(rest) if a.startswith("--")), len(rest))
    variants, overrides = rest[:at], rest[at:]
    launch = init_distributed()
    results = {}
    for variant in variants:
        micro, gas = map(int, variant.split("x"))
        results[variant] = run_variant(config_path, launch, micro, gas, overrides)
    if launch.rank == 0:
        torch.save(results, out)


if __name__ == "__main__":
    main()
