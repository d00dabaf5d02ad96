"""Stand-in trainer for the launch tests: the launch contract of `ds_vicuna.train` in ~150 lines.

    deepspeed --num_gpus 2 --no_local_rank --module standin_train CONFIG.json [--resume auto]
    torchrun --nproc_per_node 2 -m standin_train CONFIG.json [--resume auto]
    srun python -m standin_train CONFIG.json              (SLURM_PROCID/NTASKS/LOCALID mapped below)

Contract the launch scripts rely on (the real trainer implements the same): rank info from any launcher,
a finite collective timeout, SIGTERM/SIGUSR1 -> every rank finishes its step, all save `step-NNNNNN` together and
exit 75; `--resume auto` continues from the newest checkpoint; the data of step n depends only on (seed, n, rank),
so a resumed run ends with the same weights as an uninterrupted one. Prints `step N loss X` and
`done step N loss X` on rank 0 and writes `final.pt` (gathered fp32 weights) at the end.
CONFIG keys: out_dir, max_steps, save_every, seed, zero_stage, offload, sleep_per_step, timeout_s.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

REQUEUE_EXIT_CODE = 75


def map_slurm_env() -> None:
    """Under a bare `srun`, fill RANK/WORLD_SIZE/LOCAL_RANK from SLURM_* (launchers set them otherwise)."""
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ["SLURM_LOCALID"]


def ds_config(cfg: dict) -> dict:
    offload = {"device": "cpu"} if cfg["offload"] else {"device": "none"}
    return {
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.0}},
        "zero_optimization": {"stage": cfg["zero_stage"], "offload_optimizer": offload,
                              **({"offload_param": offload} if cfg["zero_stage"] == 3 else {})},
        "zero_allow_untested_optimizer": True,
    }


def batch(seed: int, step: int, rank: int):
    import torch
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step * 101 + rank)
    ids = torch.randint(3, 400, (2, 32), generator=gen)  # (micro_batch, seq)
    return ids


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--resume", default=None)
    parser.add_argument("--max_steps", type=int)
    parser.add_argument("--sleep_per_step", type=float)
    args = parser.parse_args()
    cfg = {"max_steps": 8, "save_every": 2, "seed": 0, "zero_stage": 3, "offload": True,
           "sleep_per_step": 0.0, "timeout_s": 60, **json.loads(Path(args.config).read_text())}
    cfg.update({k: v for k, v in vars(args).items() if k in cfg and v is not None})
    stop = {"signal": 0}
    for sig in (signal.SIGTERM, signal.SIGUSR1):  # first thing: a signal during imports must not kill us
        signal.signal(sig, lambda signum, _frame: stop.update(signal=signum))
    map_slurm_env()

    import deepspeed
    import torch
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=cfg["timeout_s"]))
    rank, world = dist.get_rank(), dist.get_world_size()
    print(f"[rank {rank}/{world}] host {socket.gethostname()} pid {os.getpid()}", flush=True)
    torch.manual_seed(cfg["seed"])
    model = LlamaForCausalLM(LlamaConfig(vocab_size=400, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                         max_position_embeddings=64))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config(cfg))
    if rank == 0:
        inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
        print(f"zero stage {engine.zero_optimization_stage()} optimizer {type(inner).__name__}", flush=True)
    ckpt_dir = Path(cfg["out_dir"]) / "checkpoints"
    step = 0
    if args.resume == "auto" and (ckpt_dir / "latest").is_file():
        path, client = engine.load_checkpoint(str(ckpt_dir))
        step = client["step"]
        if rank == 0:
            print(f"resumed from {path} at step {step}", flush=True)

    def save(at: int) -> None:
        engine.save_checkpoint(str(ckpt_dir), tag=f"step-{at:06d}", client_state={"step": at})

    loss_value = float("nan")
    while step < cfg["max_steps"]:
        ids = batch(cfg["seed"], step, rank)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        step += 1
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        loss_value = mean.item() / world
        if rank == 0:
            print(f"step {step} loss {loss_value:.8f}", flush=True)
        time.sleep(cfg["sleep_per_step"])
        flag = torch.tensor([stop["signal"]])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank sees a signal any rank got
        if flag.item():
            save(step)
            dist.barrier()
            if rank == 0:
                print(f"preempted (signal {flag.item()}): saved step-{step:06d}, exit {REQUEUE_EXIT_CODE}",
                      flush=True)
            return REQUEUE_EXIT_CODE
        if step % cfg["save_every"] == 0 and step < cfg["max_steps"]:
            save(step)
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=cfg["zero_stage"] == 3):
        if rank == 0:
            torch.save({n: p.detach().clone() for n, p in engine.module.named_parameters()},
                       Path(cfg["out_dir"]) / "final.pt")
    dist.barrier()
    if rank == 0:
        print(f"done step {step} loss {loss_value:.8f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
