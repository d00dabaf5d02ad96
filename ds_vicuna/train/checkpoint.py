"""Checkpoints that resume exactly and never point at a half-written folder.

Layout of `output_dir` (DeepSpeed's own layout, so its `zero_to_fp32.py` works on it too):

    step-000200/                       engine.save_checkpoint(tag="step-000200"): model/optimizer/scheduler shards
        rng_state_rank0.pt ...         python/numpy/torch RNG states, one file per rank
        hf/                            config.json + tokenizer (with template tokens) + the training record
        ds_vicuna_complete.json        written last, after every rank finished: the folder is whole
        universal/                     only after a resume at another world size (ds_vicuna.train.elastic)
    latest                             "step-000200", replaced atomically only after the marker exists

The training position rides in DeepSpeed's `client_state` under PROGRESS_KEY as a `TrainingProgress`.
`--resume auto` takes `latest` if its folder is complete, else the newest complete `step-*` folder; folders
without the marker (a crash mid-save) are ignored. A checkpoint written at another world size is loaded through
DeepSpeed's universal format (ds_vicuna.train.elastic).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

CHECKPOINT_PREFIX = "step-"
LATEST_FILE = "latest"
COMPLETE_MARKER = "ds_vicuna_complete.json"
HF_SUBDIR = "hf"
TRAIN_CONFIG_FILE = "ds_vicuna_train_config.json"  # in hf/: {"config", "precision", "step"} of the run that saved
PROGRESS_KEY = "ds_vicuna_progress"
RNG_FILE = "rng_state_rank{rank}.pt"
_STEP_RE = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from (missing, incomplete, or from a different run shape)."""


@dataclass
class TrainingProgress:
    """Where training stands: enough to continue exactly where it stopped."""

    step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    """Epoch in progress (0-based)."""
    micro_batch_in_epoch: int = 0
    """Global micro-batches of this epoch already consumed (resume skips them)."""
    seed: int = 42
    tokens_seen: int = 0
    """Real (label-or-input, non-padding) tokens processed so far over all ranks."""
    config: dict = field(default_factory=dict)
    """The resolved training config of the run that wrote the checkpoint."""

    @classmethod
    def from_dict(cls, data: dict) -> "TrainingProgress":
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def checkpoint_name(step: int) -> str:
    """`step-000200`."""
    return f"{CHECKPOINT_PREFIX}{step:06d}"


def is_complete(folder: str | os.PathLike) -> bool:
    """True when every rank finished writing `folder` (the completion marker exists)."""
    return (Path(folder) / COMPLETE_MARKER).is_file()


def list_checkpoints(output_dir: str | os.PathLike, complete_only: bool = True) -> list[Path]:
    """`step-*` folders in `output_dir`, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_RE.match(p.name))]
    return [p for _, p in sorted(found) if not complete_only or is_complete(p)]


def find_resume_path(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in `output_dir`, or None when there is none (a fresh start)."""
    root = Path(output_dir)
    latest = root / LATEST_FILE
    if latest.is_file():
        candidate = root / latest.read_text().strip()
        if is_complete(candidate):
            newer = [p for p in list_checkpoints(root) if p.name > candidate.name]
            return newer[-1] if newer else candidate
    complete = list_checkpoints(root)
    return complete[-1] if complete else None


def resolve_resume(resume: str | None, output_dir: str | os.PathLike) -> Path | None:
    """`None` -> fresh start; `auto` -> newest complete checkpoint or fresh; a path -> that checkpoint.

    Raises:
        CheckpointError: the given path is missing or incomplete.
    """
    if resume is None:
        return None
    if resume == "auto":
        return find_resume_path(output_dir)
    path = Path(resume)
    if path.is_dir() and not _STEP_RE.match(path.name) and (path / LATEST_FILE).is_file():
        found = find_resume_path(path)  # an output_dir was given
        if found is not None:
            return found
    if not path.is_dir():
        raise CheckpointError(f"--resume {resume}: no such checkpoint folder")
    if not is_complete(path):
        raise CheckpointError(f"--resume {resume}: incomplete checkpoint (no {COMPLETE_MARKER}; "
                              "the save was interrupted); use an older one or --resume auto")
    return path


def capture_rng_state() -> dict:
    """Python, numpy and torch RNG states of this process: the CPU's and this rank's own GPU's (the current CUDA
    device) only, so a resume on fewer GPUs (each rank seeing all of them, as under deepspeed or torchrun) never
    indexes a GPU it lacks."""
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def restore_rng_state(state: dict) -> None:
    """Put back a `capture_rng_state` result; the CUDA state goes to this rank's current device (a checkpoint
    written before states were per device holds a list: this device's entry, when it has one, is used)."""
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        device = torch.cuda.current_device()
        cuda = state["cuda"]
        if isinstance(cuda, (list, tuple)):  # the old format: every visible GPU's state
            cuda = cuda[device] if device < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)  # atomic on POSIX: readers see the old or the new pointer, never a partial one


def save_checkpoint(engine, output_dir: str | os.PathLike, progress: TrainingProgress, *, rank: int,
                    keep_last: int, model_config=None, tokenizer=None,
                    hf_files: dict[str, str] | None = None, trainable_only: bool = False) -> Path:
    """Save engine state + progress + RNG on every rank; rank 0 marks it complete and moves `latest`.

    Collective: every rank must call it. Rank 0 also writes `hf/` (model config, tokenizer, and `hf_files`:
    name -> text) so export needs nothing but the folder. `trainable_only` (LoRA) leaves the frozen weights out
    (DeepSpeed's `exclude_frozen_parameters`): the checkpoint holds the adapters and their optimizer state.

    Returns:
        The checkpoint folder.
    """
    import torch
    import torch.distributed as dist

    root = Path(output_dir)
    tag = checkpoint_name(progress.step)
    folder = root / tag
    engine.save_checkpoint(str(root), tag=tag, client_state={PROGRESS_KEY: asdict(progress)}, save_latest=False,
                           exclude_frozen_parameters=trainable_only)
    torch.save(capture_rng_state(), folder / RNG_FILE.format(rank=rank))
    if rank == 0 and model_config is not None:
        model_config.save_pretrained(folder / HF_SUBDIR)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder / HF_SUBDIR)
        for name, text in (hf_files or {}).items():
            (folder / HF_SUBDIR / name).write_text(text)
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    if dist.is_initialized():
        dist.barrier()  # every rank's shards and RNG files are on disk before the folder is called complete
    if rank == 0:
        _write_atomic(folder / COMPLETE_MARKER,
                      json.dumps({"step": progress.step, "epoch": progress.epoch, "world_size": world_size}) + "\n")
        _write_atomic(root / LATEST_FILE, tag)
        prune_checkpoints(root, keep_last)
    if dist.is_initialized():
        dist.barrier()
    return folder


def prune_checkpoints(output_dir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete complete checkpoints older than the newest `keep_last`, and partial ones older than those."""
    complete = list_checkpoints(output_dir)
    keep = complete[-keep_last:] if keep_last > 0 else []
    if not keep:
        return []
    oldest_kept = keep[0].name
    removed = [p for p in list_checkpoints(output_dir, complete_only=False) if p not in keep and p.name < oldest_kept]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def load_checkpoint(engine, folder: str | os.PathLike, *, rank: int,
                    universal: str | os.PathLike | None = None) -> TrainingProgress:
    """Load engine (model, optimizer, scheduler) state and this rank's RNG; return the saved progress.

    Args:
        universal: the checkpoint's universal copy (`ds_vicuna.train.elastic.prepare_resume`) when this run's world size
            differs from the one that wrote `folder`; the engine must have been built with `load_universal`. A
            universal load gives every optimizer param group group 0's hyperparameters: resume through
            `ds_vicuna.train.elastic.load_resume_checkpoint`, which puts the saved ones back.

    Raises:
        CheckpointError: the folder is incomplete or DeepSpeed finds nothing to load.
    """
    import torch

    folder = Path(folder)
    if not is_complete(folder):
        raise CheckpointError(f"{folder}: incomplete checkpoint (no {COMPLETE_MARKER})")
    source = Path(universal) if universal is not None else folder
    # a LoRA checkpoint holds the trainable weights only: the frozen ones are the freshly loaded base's
    frozen = any(not p.requires_grad for p in engine.module.parameters())
    path, client_state = engine.load_checkpoint(str(source.parent), tag=source.name, load_optimizer_states=True,
                                                load_lr_scheduler_states=True, load_module_strict=not frozen)
    if path is None or PROGRESS_KEY not in (client_state or {}):
        raise CheckpointError(f"{folder}: DeepSpeed could not load it (wrong ZeRO stage or world size?)")
    saved_ranks = len(list(folder.glob(RNG_FILE.format(rank="*"))))
    rng_file = folder / RNG_FILE.format(rank=rank % max(saved_ranks, 1))  # more ranks than saved: reuse theirs
    if rng_file.is_file():
        restore_rng_state(torch.load(rng_file, weights_only=False))
    return TrainingProgress.from_dict(client_state[PROGRESS_KEY])


def read_training_record(folder: str | os.PathLike) -> dict:
    """The `{"config", "precision", "step"}` the trainer wrote beside the weights (readable without DeepSpeed).

    Raises:
        CheckpointError: the folder has no record (not written by ds-vicuna).
    """
    path = Path(folder) / HF_SUBDIR / TRAIN_CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {HF_SUBDIR}/{TRAIN_CONFIG_FILE}; not a ds-vicuna checkpoint")
    return json.loads(path.read_text())


SHAPE_KEYS = (("data", "train_path"), ("data", "max_length"), ("data", "mask"), ("data", "batching"),
              ("data", "max_samples"), ("train", "global_batch_size"), ("train", "micro_batch_size"),
              ("train", "seed"), ("train", "epochs"), ("model", "template"), ("model", "lora"),
              ("model", "quantization"))


def check_resume_compatible(saved: dict, cfg) -> None:
    """The data position only means something for the same data/batch shape: disagreements stop the run.

    The world size may differ: the micro-batch plan is global (rank r takes its share of the same global step).

    Args:
        saved: the resolved config stored in the checkpoint (`TrainingProgress.config`).
        cfg: this run's `config.Config`.

    Raises:
        CheckpointError: listing each differing key with both values.
    """
    now = cfg.to_dict()
    diffs = [f"{s}.{k}: checkpoint {saved.get(s, {}).get(k)!r} vs now {now[s][k]!r}"
             for s, k in SHAPE_KEYS if saved.get(s, {}).get(k) != now[s][k]]
    if diffs:
        raise CheckpointError("cannot resume exactly, the run's shape changed:\n  " + "\n  ".join(diffs))
