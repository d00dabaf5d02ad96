"""Resume exactly on a different number of ranks (spot capacity that comes back smaller or larger).

    GPUS=8 launch/single_node.sh cfg.yaml       # checkpoints step-000200 with 8 ZeRO partitions, preempted
    GPUS=4 launch/single_node.sh cfg.yaml       # --resume auto: converts step-000200 once, continues on 4

A ZeRO checkpoint is partitioned per rank, so DeepSpeed loads it only at the world size that wrote it. When the
world size changed, rank 0 converts the checkpoint with DeepSpeed's own `ds_to_universal` into a universal
checkpoint kept beside the original, and every rank loads it with DeepSpeed's `checkpoint.load_universal`:

    step-000200/                        written by 8 ranks (zero_pp_rank_{0..7}_mp_rank_00_*_states.pt)
        universal/                      ds_to_universal's output, made once, reused by every later resume
            zero/<param>/fp32.pt ...    one full tensor per parameter and state (fp32, exp_avg, exp_avg_sq)
            ds_vicuna_universal_complete.json   written last: the copy is whole

What stays exact whatever the world size: the data position (the micro-batch plan is global, rank r takes its
share of the same global step, see `train.rank_share`), the LR schedule (DeepSpeed's checkpoint), and the random
numbers a micro-batch draws (dropout): the trainer seeds torch with `micro_batch_seed(seed, epoch, global
micro-batch index)`, not from a per-rank stream that cannot be split or merged. Only the order of float sums
changes (gradients reduced over another number of ranks), so losses agree to ~1e-6, not bit for bit.

The converter reads each rank's optimizer file whole (fp32 weights + Adam moments: 12 bytes per parameter divided
by the old world size), up to min(4, CPUs) files at a time, in its own process on rank 0's node.

ZeRO-1/2 checkpoints take DeepSpeed's other universal path (`--inject_missing_state`: a Hugging Face model has no
Megatron-style universal info). DeepSpeed 0.19 ZeRO-3 universal checkpoints have two limitations worked around
here (both reproduced in tests/train/test_loop_resume.py):
- `ds_to_universal` stores rank 0's whole optimizer partition (fp32 weights and both Adam moments) in
  `zero/optimizer_state.pt`, and every rank of the resumed job loads that file to read a step count and the param
  groups: `slim_optimizer_state` keeps only those.
- `load_hp_checkpoint_state_from_checkpoint_dir_stage3` copies param group 0's hyperparameters into every group,
  so weight decay reaches the no-decay group (norms): `restore_param_groups` puts each group's own back.
"""
from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ds_vicuna.train.checkpoint import CheckpointError, TrainingProgress, load_checkpoint

UNIVERSAL_SUBDIR = "universal"
UNIVERSAL_MARKER = "ds_vicuna_universal_complete.json"
OPTIMIZER_STATE_FILE = "zero/optimizer_state.pt"
# Rank 0 converts while the others wait in a collective: a 70B checkpoint takes longer than the usual timeout.
CONVERT_TIMEOUT = datetime.timedelta(hours=6)
_ZERO_RANK_RE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


def saved_world_size(folder: str | os.PathLike) -> int | None:
    """How many data-parallel ranks wrote the ZeRO partitions in `folder`; None when nothing is partitioned
    (ZeRO stage 0 saves the optimizer whole, which loads at any world size)."""
    ranks = {int(m.group(1)) for p in Path(folder).glob("*zero_pp_rank_*_optim_states.pt")
             if (m := _ZERO_RANK_RE.search(p.name))}
    return max(ranks) + 1 if ranks else None


def universal_copy(folder: str | os.PathLike) -> Path:
    """Where the converted copy of a `step-*` checkpoint lives."""
    return Path(folder) / UNIVERSAL_SUBDIR


def is_converted(folder: str | os.PathLike) -> bool:
    return (universal_copy(folder) / UNIVERSAL_MARKER).is_file()


def convert_to_universal(folder: str | os.PathLike, workers: int | None = None) -> Path:
    """Convert a complete ZeRO checkpoint with DeepSpeed's `ds_to_universal`, once (a whole copy is reused).

    The converter runs in its own process (its memory is returned before the model is built) into a temporary
    folder that is renamed into place after the marker is written, so a crash never leaves a copy that looks whole.

    Args:
        workers: parallel extract processes (each holds one rank's optimizer file); default min(4, CPUs).

    Returns:
        The `universal/` folder.

    Raises:
        CheckpointError: the converter failed (its output went to this process's stdout/stderr).
    """
    folder = Path(folder)
    target = universal_copy(folder)
    if is_converted(folder):
        return target
    for stale in folder.glob(f".{UNIVERSAL_SUBDIR}.tmp-*"):  # a conversion that crashed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = folder / f".{UNIVERSAL_SUBDIR}.tmp-{os.getpid()}"
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    # `python -m deepspeed.checkpoint.ds_to_universal ARGS`, minus runpy's warning about a preloaded module
    cmd = [sys.executable, "-c", "from deepspeed.checkpoint.ds_to_universal import main, parse_arguments; "
           "main(parse_arguments())", "--input_folder", str(folder), "--output_folder", str(tmp),
           "--num_extract_workers", str(workers), "--num_merge_workers", str(max(1, workers // 2)),
           "--inject_missing_state"]  # ZeRO-1/2: a Hugging Face model carries no Megatron-style universal info
    started = time.perf_counter()
    code = subprocess.call(cmd)
    (folder / "latest_universal").unlink(missing_ok=True)  # the converter points it at our temporary name
    if code != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"{folder}: DeepSpeed's universal checkpoint conversion failed (exit {code}): "
                              + " ".join(cmd))
    slim_optimizer_state(tmp / OPTIMIZER_STATE_FILE)
    marker = {"source_world_size": saved_world_size(folder), "seconds": round(time.perf_counter() - started, 1)}
    (tmp / UNIVERSAL_MARKER).write_text(json.dumps(marker) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def slim_optimizer_state(path: Path) -> None:
    """Keep in `zero/optimizer_state.pt` only what the ZeRO-3 universal loader reads: the step count, the param
    groups and the loss-scaler state (ds_to_universal also copies rank 0's fp32 partition and Adam moments)."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=False)
    inner = state.get("optimizer_state_dict")
    if not isinstance(inner, dict) or "state" not in inner:  # not the ZeRO-3 layout: leave it as DeepSpeed wrote it
        return
    inner["state"] = {key: {"step": value["step"]} for key, value in inner["state"].items() if "step" in value}
    slim = {key: value for key, value in state.items() if not _holds_large_tensor(value)}
    torch.save(slim, path)


def _holds_large_tensor(value) -> bool:
    import torch

    if isinstance(value, torch.Tensor):
        return value.numel() > 1
    if isinstance(value, (list, tuple)):
        return any(_holds_large_tensor(v) for v in value)
    return False


def load_resume_checkpoint(engine, folder: str | os.PathLike, *, rank: int,
                           universal: str | os.PathLike | None = None) -> TrainingProgress:
    """`load_checkpoint`, from the universal copy when `prepare_resume` made one, with each optimizer param
    group's own hyperparameters put back after a universal load.

    Raises:
        CheckpointError: the folder is incomplete, DeepSpeed finds nothing to load, or the param groups differ.
    """
    progress = load_checkpoint(engine, folder, rank=rank, universal=universal)
    if universal is not None:
        fixed = restore_param_groups(engine, folder)
        if fixed and rank == 0:
            print("[ds-vicuna] DeepSpeed's universal load gave every optimizer param group the hyperparameters of "
                  "group 0; restored the saved ones: " + ", ".join(fixed), flush=True)
    return progress


def restore_param_groups(engine, folder: str | os.PathLike) -> list[str]:
    """Give each optimizer param group its own saved hyperparameters (weight decay, betas...) after a ZeRO-3
    universal load, which copied group 0's into all of them.

    Returns:
        What was put back, e.g. ["group 1 weight_decay 0.1 -> 0.0"] (empty when DeepSpeed got it right).
    """
    import torch

    saved = torch.load(universal_copy(folder) / OPTIMIZER_STATE_FILE, map_location="cpu", weights_only=False)
    groups = saved.get("param_groups") or []  # ds_to_universal writes them here for every ZeRO stage
    live = getattr(engine.optimizer, "optimizer", engine.optimizer).param_groups
    if len(groups) != len(live):
        raise CheckpointError(f"{folder}: the checkpoint has {len(groups)} optimizer param groups, this run "
                              f"{len(live)}; it was written by another version of the trainer")
    fixed = []
    for index, (group, values) in enumerate(zip(live, groups)):
        for key, value in values.items():
            if key != "params" and group.get(key) != value:
                fixed.append(f"group {index} {key} {group.get(key)} -> {value}")
                group[key] = value
    return fixed


def prepare_resume(folder: Path, launch) -> Path | None:
    """Collective: if `folder` was written at another world size, make sure its universal copy exists (rank 0
    converts, the others wait) and return it; None when DeepSpeed can load `folder` as it is.

    Raises:
        CheckpointError: on every rank, when the conversion failed on rank 0.
    """
    saved = saved_world_size(folder)
    if saved is None or saved == launch.world_size:
        return None
    error = None
    if launch.is_main:
        done = is_converted(folder)
        print(f"[ds-vicuna] {folder.name} was written by {saved} rank(s), this run has {launch.world_size}: "
              + (f"using its universal copy {universal_copy(folder)}" if done else
                 f"converting it once with DeepSpeed's ds_to_universal into {universal_copy(folder)}"), flush=True)
        started = time.perf_counter()
        try:
            convert_to_universal(folder)
        except CheckpointError as err:
            error = str(err)
        if not done and error is None:
            print(f"[ds-vicuna] converted in {time.perf_counter() - started:.1f} s", flush=True)
    error = _broadcast_from_main(error)
    if error:
        raise CheckpointError(error)
    return universal_copy(folder)


def _broadcast_from_main(value):
    """Rank 0's `value` on every rank, waiting up to CONVERT_TIMEOUT (not the job's short collective timeout)."""
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    group = dist.new_group(backend="gloo", timeout=CONVERT_TIMEOUT)
    box = [value]
    dist.broadcast_object_list(box, src=0, group=group)
    dist.destroy_process_group(group)
    return box[0]


def with_universal_load(ds: dict) -> dict:
    """A copy of the DeepSpeed dict that loads universal checkpoints (`checkpoint.load_universal`)."""
    return {**ds, "checkpoint": {**ds.get("checkpoint", {}), "load_universal": True}}


def micro_batch_seed(seed: int, epoch: int, index: int) -> int:
    """The RNG seed of global micro-batch `index` of `epoch`: the same on whichever rank, at whichever world size."""
    return ((seed * 1_000_003 + epoch) * 1_000_000_007 + index) % (1 << 63)
