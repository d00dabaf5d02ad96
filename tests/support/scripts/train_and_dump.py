"""Run the trainer like `deepspeed --module ds_vicuna.train CONFIG [--key value]`, then dump on rank 0 what tests
compare: this run's losses, the engine's parameters gathered from the ZeRO-3 partitions (as float32; bf16 on a
bf16 run), the optimizer's fp32 master copy of the trainable ones and their names, the model's module classes.

    deepspeed --num_gpus 2 tests/support/scripts/train_and_dump.py DUMP.pt CONFIG [--key value ...]
"""
import os
import sys

import deepspeed
import torch
from deepspeed.utils import safe_get_full_fp32_param

from ds_vicuna.config import load_config
from ds_vicuna.train.launch_env import shutdown_distributed
from ds_vicuna.train.loop import train
from ds_vicuna.train.cli import quiet_library_warnings


def main() -> int:
    quiet_library_warnings()
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    dump, config, overrides = args[0], args[1], args[2:]
    result = train(load_config(config, overrides))
    module = result.engine.module
    params, master = {}, {}
    for name, param in module.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):  # collective: every rank gathers the full tensor
            params[name] = param.detach().float().cpu()
        if param.requires_grad:  # frozen weights (LoRA's base) have no optimizer master copy
            master[name] = safe_get_full_fp32_param(param).detach().clone().cpu()  # collective too
    if torch.distributed.get_rank() == 0:
        trainable = sorted(n for n, p in module.named_parameters() if p.requires_grad)
        module_types = sorted({type(m).__name__ for m in module.modules()})  # e.g. Linear4bit under QLoRA
        torch.save({"losses": result.losses, "params": params, "master": master, "trainable": trainable,
                    "module_types": module_types,
                    "step": result.progress.step,
                    "checkpoint": str(result.checkpoint), "exit_code": result.exit_code}, dump)
    shutdown_distributed()  # as the CLI does: leave together, or a rank may abort at exit ("terminate called")
    return result.exit_code


if __name__ == "__main__":
    code = main()
    # Leave without the interpreter's native teardown: a rank of a finished 2-rank run sometimes aborted there
    # ("terminate called without an active exception", exit -6, even after barrier + destroy), failing a run whose
    # work and dump were complete.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
