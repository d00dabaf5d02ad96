"""Fine-tune a Hugging Face causal LM on conversations with DeepSpeed ZeRO (Vicuna's recipe by default).

    deepspeed --num_gpus 8 --module ds_vicuna.train configs/vicuna_7b.yaml --data.train_path data/train.json
    torchrun --nproc_per_node 8 -m ds_vicuna.train configs/vicuna_7b.yaml
    srun python -m ds_vicuna.train configs/vicuna_7b.yaml            # rank/world from SLURM_* (launch_env)
    python -m ds_vicuna.train configs/demo.yaml --train.max_steps 5   # one process (CPU: gloo, fp32)
    ds-vicuna train configs/demo.yaml                                  # same as the line above

Skeleton: setup (config checks, model, data, engine) -> fit (loss_step per micro-batch, engine.step per
optimizer step, checkpoints, preemption) -> evaluate -> save_checkpoint.

The loss is the mean over ALL assistant tokens of the optimizer step: each micro-batch backpropagates its
token-loss *sum* divided by the step's global label-token count, so a short sample's tokens weigh the same
as a long one's, whatever the micro-batch size, accumulation or world size.
"""
from __future__ import annotations

import json
import math
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from ds_vicuna.config import DEFAULT_LOSS_CHUNK_TOKENS, Config, ConfigError, fill_deepspeed_config, \
    load_deepspeed_config, offloads_optimizer, resolve_precision
from ds_vicuna.model.tokenizer import load_tokenizer
from ds_vicuna.train.checkpoint import (TRAIN_CONFIG_FILE, TrainingProgress, check_resume_compatible,
                                        read_training_record, resolve_resume, save_checkpoint)
from ds_vicuna.train.elastic import load_resume_checkpoint, micro_batch_seed, prepare_resume, with_universal_load
from ds_vicuna.train.launch_env import LaunchEnv, detect_launch_env, init_distributed
from ds_vicuna.train.lora import count_parameters
from ds_vicuna.train.loss import add_label_index, count_label_tokens, token_loss_sum
from ds_vicuna.train.preemption import REQUEUE_EXIT_CODE, PreemptionGuard
from ds_vicuna.train.sequence_parallel import check_sequence_parallel, register_ulysses, shard_batch
from ds_vicuna.train.metrics import (LOSS_PLOT, MetricsLogger, describe_engine, matmul_params, peak_flops,
                                     peak_rss_bytes, plot_loss, progress_bar, step_flops, step_profile,
                                     write_memory_report)
from ds_vicuna.train.build import (bf16_supported, build_engine, build_model, build_model_config, check_cpu_adam,
                                   cpu_has_native_bf16, enable_tf32, pick_training_attention,
                                   share_cpu_threads_if_needed)


class TrainError(RuntimeError):
    """Training cannot start or continue; the message says why and what to change."""


@dataclass
class Run:
    """Everything `fit` needs, built once by `setup`."""

    cfg: Config
    launch: LaunchEnv
    engine: object
    tokenizer: object
    model_config: object
    train_data: object
    train_indices: list[int]
    eval_data: object | None
    eval_indices: list[int]
    plans: list[list[list[int]]]  # per epoch: the global micro-batches (lists of dataset indices)
    grad_accum: int
    steps_per_epoch: list[int]
    total_steps: int
    num_params: int
    trainable_params: int  # all of num_params in full fine-tuning; the adapters (+ modules_to_save) with LoRA
    matmul_params: int  # what MFU counts (train_metrics.matmul_params)
    peak_flops: float | None
    flatten_packs: bool
    precision: str
    sp_size: int = 1  # ranks per sequence-parallel group: consecutive ranks that train the same micro-batches
    progress: TrainingProgress = field(default_factory=TrainingProgress)

    @property
    def dp_rank(self) -> int:
        """Which data-parallel replica (sequence-parallel group) this rank belongs to."""
        return self.launch.rank // self.sp_size

    @property
    def dp_size(self) -> int:
        """Replicas that train different micro-batches: world size / sequence_parallel_size."""
        return self.launch.world_size // self.sp_size

    @property
    def sp_rank(self) -> int:
        """This rank's shard of every row within its sequence-parallel group."""
        return self.launch.rank % self.sp_size


@dataclass
class TrainResult:
    """What a run did (returned by `train`, used by tests, the demo and the benchmark)."""

    progress: TrainingProgress
    losses: dict[int, float]  # step -> loss (this run's steps only)
    exit_code: int
    checkpoint: Path | None
    engine: object = None
    metrics_path: Path | None = None
    plot_path: Path | None = None


# ------------------------------------------------------------------------------------------------------ checks


def preflight(cfg: Config) -> dict:
    """Every check that needs no model: files exist and parse, max_length fits the model, `template: auto`
    resolved (written into `cfg`), the output folder, the DeepSpeed config, CPU Adam when offloading.

    Returns:
        The DeepSpeed engine dict (not yet filled).

    Raises:
        ConfigError: with the field or file to fix.
    """
    from ds_vicuna.model.embedded import resolve_model_path

    if not cfg.data.train_path:
        raise ConfigError("data.train_path is required (e.g. --data.train_path data/train.json)")
    for name, path in cfg.data.named_paths():
        if not Path(path).is_file():
            raise ConfigError(f"{name}: {path} not found")
        if not os.access(path, os.R_OK):
            raise ConfigError(f"{name}: {path} is not readable")
    try:
        model_path = resolve_model_path(cfg.model.name_or_path)
    except FileNotFoundError as err:
        raise ConfigError(f"model.name_or_path: {err}") from None
    for needed in ("config.json",):
        if not os.access(Path(model_path) / needed, os.R_OK):
            raise ConfigError(f"model.name_or_path: {model_path / needed} is not readable")
    from ds_vicuna.chat.templates import TemplateError, get_template
    from ds_vicuna.model.tokenizer import check_max_length, resolve_template

    try:
        check_max_length(model_path, cfg.data.max_length, rope_scaling=cfg.model.rope_scaling)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    template, why = resolve_template(cfg.model.template, model_path)
    if template != cfg.model.template:
        print(f"[ds-vicuna] model.template: {template} ({why})", flush=True)
        cfg.model.template = template  # the checkpoint records the template it was trained with
    try:
        get_template(cfg.model.template)
    except TemplateError as err:
        raise ConfigError(f"model.template: {err}") from None
    check_output_dir(cfg)
    ds = load_deepspeed_config(cfg.train.deepspeed)
    if offloads_optimizer(ds):
        check_cpu_adam()
    return ds


RUN_FILES = ("metrics.jsonl", "latest", LOSS_PLOT, "tensorboard")  # with step-* folders: what a run leaves


def previous_run(output_dir: str | os.PathLike) -> list[Path]:
    """What an earlier run left in `output_dir`: its checkpoints, metrics, loss curve (the data cache is not)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    return sorted(folder.glob("step-*")) + [folder / n for n in RUN_FILES if (folder / n).exists()]


def check_output_dir(cfg: Config) -> None:
    """An output folder that holds a run needs `resume` (continue it) or `overwrite` (start over).

    Raises:
        ConfigError: naming the folder, what is in it, and both choices.
    """
    found = previous_run(cfg.train.output_dir)
    if found and cfg.train.resume is None and not cfg.train.overwrite:
        shown = ", ".join(p.name for p in found[:4]) + (", ..." if len(found) > 4 else "")
        raise ConfigError(f"train.output_dir: {cfg.train.output_dir} already holds a run ({shown}); continue it "
                          "with --resume auto, start over with --overwrite (deletes those), or choose another "
                          "--train.output_dir")


def clear_previous_run(output_dir: str | os.PathLike) -> None:
    """Delete what `previous_run` finds (`train.overwrite`); the main rank does it, before any rank writes."""
    import shutil

    for path in previous_run(output_dir):
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


# ------------------------------------------------------------------------------------------------------- setup


def setup(cfg: Config, ds_base: dict, launch: LaunchEnv) -> Run:
    """Tokenizer, data, micro-batch plan, model (partitioned under ZeRO-3), optimizer and DeepSpeed engine."""
    import torch

    from ds_vicuna.train.batching import configure_model_for_packing
    from ds_vicuna.model.embedded import resolve_model_path

    torch.manual_seed(cfg.train.seed)
    model_path = resolve_model_path(cfg.model.name_or_path)
    tokenizer = load_tokenizer(model_path, cfg.model.template)
    train_data, train_indices = load_data(cfg, cfg.data.train_path, tokenizer, "data.train_path")
    eval_data, eval_indices = (None, [])
    if cfg.data.eval_path:
        eval_data, eval_indices = load_data(cfg, cfg.data.eval_path, tokenizer, "data.eval_path")
    grad_accum = cfg.gradient_accumulation_steps(launch.world_size)
    plans = [plan_epoch(cfg, train_data, train_indices, epoch) for epoch in range(cfg.train.epochs)]
    sp_size = cfg.train.sequence_parallel_size
    per_step = grad_accum * cfg.data_parallel_size(launch.world_size)
    steps_per_epoch = [len(plan) // per_step for plan in plans]
    if steps_per_epoch[0] == 0:
        raise ConfigError(f"{cfg.data.train_path}: {len(plans[0])} micro-batches of {cfg.train.micro_batch_size} "
                          f"make no full optimizer step of {per_step}; lower train.global_batch_size")
    total_steps = sum(steps_per_epoch)
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    share_cpu_threads_if_needed(device_type, ds_base)
    precision = resolve_precision(cfg.train.precision, device_type, bf16_supported(device_type))
    enable_tf32(precision, device_type)  # what peak_flops("fp32") assumes
    if precision == "bf16" and device_type == "cpu" and not cpu_has_native_bf16() and launch.is_main:
        print("[ds-vicuna] bf16 on a CPU without avx512_bf16/AMX: matmuls are emulated (slower than fp32); "
              "parameters, gradients and activations take half the memory", flush=True)
    model_config = build_model_config(model_path, cfg)
    attn = pick_training_attention(cfg.model.attn_implementation, cfg.data.batching, sp_size, device_type)
    check_sequence_parallel(sp_size, launch.world_size, model_config, attn, ds_base)
    ds = fill_deepspeed_config(ds_base, micro_batch_size=cfg.train.micro_batch_size, grad_accum=grad_accum,
                               world_size=launch.world_size, hidden_size=model_config.hidden_size,
                               precision=precision, max_grad_norm=cfg.train.max_grad_norm,
                               sequence_parallel_size=sp_size)
    model = build_model(model_path, model_config, tokenizer, cfg, ds, precision, attn_implementation=attn,
                        log=print if launch.is_main else lambda _: None)
    model_config = model.config  # after any embedding resize
    flatten = configure_model_for_packing(model) if cfg.data.batching == "pack" else False
    mpu = register_ulysses(model, sp_size, rows=1 if flatten else cfg.train.micro_batch_size) if sp_size > 1 else None
    engine = build_engine(model, ds, cfg, total_steps, mpu=mpu)
    trainable_params, num_params = count_parameters(engine.module)
    peak = peak_flops(precision) if device_type == "cuda" else None
    return Run(cfg=cfg, launch=launch, engine=engine, tokenizer=tokenizer, model_config=model_config,
               train_data=train_data, train_indices=train_indices, eval_data=eval_data, eval_indices=eval_indices,
               plans=plans, grad_accum=grad_accum, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
               num_params=num_params, trainable_params=trainable_params, matmul_params=matmul_params(engine.module),
               peak_flops=peak,
               flatten_packs=flatten, precision=precision, sp_size=sp_size,
               progress=TrainingProgress(seed=cfg.train.seed, config=cfg.to_dict()))


def load_data(cfg: Config, path: str | list, tokenizer, name: str):
    """Tokenize (rank 0 builds the cache, the others wait and read it) and choose the samples to train on.

    `path` may be a weighted mix (see `DataConfig.train_path`); the result is a `MixedDataset` either way.

    Raises:
        ConfigError: an unreadable file, samples longer than max_length, or nothing to train on.
    """
    from ds_vicuna.config import parse_sources
    from ds_vicuna.train.dataset import build_mixture

    cache_dir = cfg.data.cache_dir or str(Path(cfg.train.output_dir) / "cache")
    try:
        data = build_mixture(parse_sources(path, name), tokenizer, cfg.model.template, cfg.data.max_length,
                             cfg.data.mask, cache_dir)
    except (ValueError, OSError) as err:  # FormatError and EncodingError are ValueErrors
        raise ConfigError(f"{name}: {err}") from None
    indices = list(range(len(data)))
    if cfg.data.max_samples is not None:
        indices = indices[:cfg.data.max_samples]
    if not indices:
        raise ConfigError(f"{name}: {path} holds no conversation to train on")
    return data, indices


def plan_epoch(cfg: Config, data, indices: list[int], epoch: int) -> list[list]:
    """The epoch's micro-batches as dataset indices, identical on every rank (a pure function of seed/epoch).

    For `pack` a micro-batch is a list of rows (each a list of indices), otherwise a list of indices.
    """
    from ds_vicuna.train.batching import make_micro_batches

    indices = data.epoch_indices(indices, cfg.train.seed, epoch)  # a weighted mix repeats/subsamples sources
    lengths = [int(data.lengths[i]) for i in indices]
    batches = make_micro_batches(lengths, cfg.data.batching, cfg.data.max_length, cfg.train.micro_batch_size,
                                 cfg.train.seed, epoch)
    if cfg.data.batching == "pack":
        return [[[indices[j] for j in row] for row in batch] for batch in batches]
    return [[indices[j] for j in batch] for batch in batches]


def samples_of(micro_batch: list) -> list[int]:
    """Dataset indices in one planned micro-batch (flattening packed rows)."""
    return [i for item in micro_batch for i in (item if isinstance(item, list) else [item])]


# --------------------------------------------------------------------------------------------------------- fit


def rank_share(run: Run, position: int) -> range:
    """The global micro-batch indices (in the epoch's plan) this rank runs in the optimizer step starting at
    `position`: the plan is global, so at any world size the step covers the same micro-batches."""
    start = position + run.dp_rank * run.grad_accum  # a sequence-parallel group shares its micro-batches
    return range(start, start + run.grad_accum)


def step_batches(run: Run, epoch: int, position: int) -> list[list[int]]:
    """This rank's `grad_accum` micro-batches of the optimizer step starting at global micro-batch `position`
    (the same on every rank of a sequence-parallel group)."""
    share = rank_share(run, position)
    return run.plans[epoch][share.start:share.stop]


def make_batch(run: Run, data, micro_batch: list) -> dict:
    """Collate one planned micro-batch into tensors on the engine's device (the loss uses `labels` itself);
    under sequence parallelism, this rank's shard of it with pre-shifted `shift_labels`. The labelled positions
    and their count are found here on the host (`add_label_index`): the step then never waits for the GPU."""
    import torch

    from ds_vicuna.train.batching import collate, fetch_micro_batch

    strategy = run.cfg.data.batching
    batch = collate(fetch_micro_batch(data, micro_batch, strategy), strategy, run.cfg.data.max_length,
                    run.tokenizer.pad_token_id, flatten=run.flatten_packs)
    batch.pop("num_label_tokens")
    if run.sp_size > 1:
        rows = 1 if run.flatten_packs else run.cfg.train.micro_batch_size
        batch = shard_batch(batch, run.sp_rank, run.sp_size, run.tokenizer.pad_token_id, rows)
    batch = add_label_index(batch)
    return {k: v.to(run.engine.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def loss_step(engine, batch: dict, scale: float, chunk_tokens: int | None = DEFAULT_LOSS_CHUNK_TOKENS):
    """Forward + backward of one micro-batch; returns its token-loss sum as a detached device tensor.

    `scale` = world_size * grad_accum / global_label_tokens: DeepSpeed divides by grad_accum in backward and
    ZeRO-3's reduce-scatter divides the gradients summed over ranks by the world size (also under sequence
    parallelism, where each rank's loss covers its shard of the rows), so the step's gradient is
    d(sum of all token losses)/d(w) / global tokens.
    The sum is not read here: reading it would make the host wait for the GPU after every micro-batch.
    """
    loss_sum = token_loss_sum(engine, batch, chunk_tokens)
    engine.backward(loss_sum * scale)
    return loss_sum.detach()


def all_reduce_sum(values: list, device) -> list[float]:
    """Sum a few numbers (floats or 0-dim tensors) over ranks in float64; one host sync for all of them (none for
    host numbers in a single process)."""
    import torch
    import torch.distributed as dist

    distributed = dist.is_initialized() and dist.get_world_size() > 1
    if not distributed and all(isinstance(v, (int, float)) for v in values):
        return [float(v) for v in values]

    tensor = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])  # [len(values)]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor.tolist()


def optimizer_step(run: Run, batches: list[dict], before_update=None, seeds: list[int] | None = None
                   ) -> tuple[float, int]:
    """One optimizer step from this rank's micro-batches: loss_step + engine.step() per micro-batch.

    DeepSpeed counts micro-steps in `engine.step()` and only updates the weights (and the LR schedule) on the
    last one of each `grad_accum`.

    Args:
        before_update: called with the engine after the last backward, before the weights change (tests read
            gradients there with `deepspeed.utils.safe_get_full_grad`).
        seeds: torch seed per micro-batch (`elastic.micro_batch_seed`): dropout masks that do not depend on the
            rank or the world size.

    Returns:
        (mean loss over all label tokens of the global step, global label-token count).
    """
    import torch

    local_tokens = sum(count_label_tokens(b) for b in batches)
    global_tokens = int(all_reduce_sum([local_tokens], run.engine.device)[0])
    scale = run.launch.world_size * run.grad_accum / max(global_tokens, 1)
    local_sum = 0.0
    for i, batch in enumerate(batches):
        if seeds is not None:
            torch.manual_seed(seeds[i])
        local_sum = local_sum + loss_step(run.engine, batch, scale, run.cfg.train.loss_chunk_tokens)
        if before_update is not None and i == len(batches) - 1:
            before_update(run.engine)
        run.engine.step()
    global_sum = all_reduce_sum([local_sum], run.engine.device)[0]
    return global_sum / max(global_tokens, 1), global_tokens


def fit(run: Run, guard: PreemptionGuard, logger: MetricsLogger) -> tuple[dict[int, float], int]:
    """The training loop. Returns ({step: loss} of this run, exit code)."""
    cfg, progress, engine = run.cfg, run.progress, run.engine
    per_step = run.grad_accum * run.dp_size
    losses: dict[int, float] = {}
    steps_this_run, exit_code = 0, 0
    bar = progress_bar(run)
    while progress.step < run.total_steps:
        if progress.micro_batch_in_epoch + per_step > len(run.plans[progress.epoch]):
            progress.epoch, progress.micro_batch_in_epoch = progress.epoch + 1, 0  # leftover micro-batches dropped
            continue
        indices = step_batches(run, progress.epoch, progress.micro_batch_in_epoch)
        seeds = [micro_batch_seed(cfg.train.seed, progress.epoch, i)
                 for i in rank_share(run, progress.micro_batch_in_epoch)]
        started = time.perf_counter()
        lr = engine.get_lr()[0]  # the rate this step uses (the scheduler advances inside engine.step)
        with step_profile(cfg.train.output_dir, run.launch.rank, cfg.train.profile_step == steps_this_run + 1):
            loss, label_tokens = optimizer_step(run, [make_batch(run, run.train_data, b) for b in indices],
                                                seeds=seeds)
        # a sequence-parallel group trains its micro-batches once: its first rank counts their tokens
        samples = [i for b in indices for i in samples_of(b)] if run.sp_rank == 0 else []
        lengths = [int(run.train_data.lengths[i]) for i in samples]
        real_tokens, flops = all_reduce_sum([sum(lengths), step_flops(run, lengths)], engine.device)
        elapsed = time.perf_counter() - started
        progress.step += 1
        progress.micro_batch_in_epoch += per_step
        progress.tokens_seen += int(real_tokens)
        losses[progress.step] = loss
        steps_this_run += 1
        record = {"step": progress.step, "epoch": progress.epoch, "loss": loss, "lr": lr,
                  "label_tokens": label_tokens, "tokens": int(real_tokens), "tokens_per_s": real_tokens / elapsed,
                  "step_time_s": elapsed, "grad_norm": _grad_norm(engine)}
        if run.peak_flops:
            record["mfu"] = flops / elapsed / (run.peak_flops * run.launch.world_size)
        if cfg.train.stop_after_steps and steps_this_run >= cfg.train.stop_after_steps:
            guard.request()
        stopping = guard.should_stop()  # collective: every rank agrees
        if progress.step % cfg.train.log_every == 0 or stopping or progress.step == run.total_steps:
            logger.log(record)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
        if cfg.data.eval_path and cfg.train.eval_every and progress.step % cfg.train.eval_every == 0:
            logger.log({"step": progress.step, "eval_loss": evaluate(run)})
        if stopping:
            exit_code = REQUEUE_EXIT_CODE if guard.agreed_signal is not None else 0
            break
        if progress.step % cfg.train.save_every == 0 and progress.step < run.total_steps:
            save(run)
    if bar is not None:
        bar.close()
    return losses, exit_code


def _grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)


def evaluate(run: Run) -> float:
    """Mean loss over all assistant tokens of the eval set (every rank runs the same number of forwards)."""
    import torch

    plan = plan_epoch(run.cfg, run.eval_data, run.eval_indices, epoch=0)
    replicas, replica = run.dp_size, run.dp_rank
    per_rank = math.ceil(len(plan) / replicas)
    mine = plan[replica::replicas]
    weights = [1.0] * len(mine) + [0.0] * (per_rank - len(mine))  # ZeRO-3 needs equal forward counts
    mine = mine + [plan[0]] * (per_rank - len(mine))
    run.engine.eval()
    loss_sum = tokens = 0.0
    with torch.no_grad():
        for indices, weight in zip(mine, weights):
            batch = make_batch(run, run.eval_data, indices)
            loss_sum = loss_sum + weight * token_loss_sum(run.engine, batch, run.cfg.train.loss_chunk_tokens)
            tokens += weight * count_label_tokens(batch)
    run.engine.train()
    loss_sum, tokens = all_reduce_sum([loss_sum, tokens], run.engine.device)
    return loss_sum / max(tokens, 1)


def save(run: Run) -> Path:
    """Checkpoint the engine + progress (collective); `hf/` holds config, tokenizer and the training record."""
    record = {"config": run.cfg.to_dict(), "precision": run.precision, "step": run.progress.step}
    return save_checkpoint(run.engine, run.cfg.train.output_dir, run.progress, rank=run.launch.rank,
                           keep_last=run.cfg.train.keep_last, model_config=run.model_config,
                           tokenizer=run.tokenizer, hf_files={TRAIN_CONFIG_FILE: json.dumps(record, indent=2) + "\n"},
                           trainable_only=run.cfg.model.lora is not None)


# -------------------------------------------------------------------------------------------------------- main


def train(cfg: Config, launch: LaunchEnv | None = None, guard: PreemptionGuard | None = None) -> TrainResult:
    """setup -> (resume) -> fit -> evaluate -> save_checkpoint; collective on every rank.

    Args:
        guard: the SIGTERM/SIGUSR1 handler, owned by the caller: `main` installs it before anything slow and
            keeps it through the final save, so a stop signal is never fatal. Made (and removed) here when None.

    Raises:
        ConfigError, CheckpointError: before training starts.
    """
    if guard is None:
        with PreemptionGuard() as own_guard:
            return train(cfg, launch, own_guard)
    launch = launch or detect_launch_env()
    cfg.gradient_accumulation_steps(launch.world_size)  # a world size that cannot split the global batch: stop now
    ds_base = preflight(cfg)
    if cfg.train.overwrite and launch.is_main:  # before the rendezvous: no rank writes there before it
        clear_previous_run(cfg.train.output_dir)
    launch = init_distributed(launch)
    print(f"[ds-vicuna] rank {launch.rank}/{launch.world_size} (local rank {launch.local_rank}) on "
          f"{socket.gethostname()} pid {os.getpid()}, started by {launch.launcher.value}, "
          f"rendezvous {launch.master_addr}:{launch.master_port}", flush=True)
    Path(cfg.train.output_dir).mkdir(parents=True, exist_ok=True)
    if launch.is_main:
        import yaml

        print(f"[ds-vicuna] resolved config (world size {launch.world_size}):\n"
              + yaml.safe_dump(cfg.to_dict(), sort_keys=False), flush=True)
    resume_from = resolve_resume(cfg.train.resume, cfg.train.output_dir)
    universal = None
    if resume_from is not None:
        check_resume_compatible(read_training_record(resume_from)["config"], cfg)  # before converting or loading
        universal = prepare_resume(resume_from, launch)  # written at another world size: DeepSpeed's universal copy
        if universal is not None:
            ds_base = with_universal_load(ds_base)
    run = setup(cfg, ds_base, launch)
    if launch.is_main:
        print("[ds-vicuna] " + describe_engine(run), flush=True)
    if resume_from is not None:
        run.progress = load_resume_checkpoint(run.engine, resume_from, rank=launch.rank, universal=universal)
        check_resume_compatible(run.progress.config, cfg)
        run.progress.config = cfg.to_dict()
        if launch.is_main:
            print(f"[ds-vicuna] resumed from {resume_from} at step {run.progress.step}", flush=True)
    logger = MetricsLogger(cfg.train.output_dir, enabled=launch.is_main, start_step=run.progress.step)
    rss_before_training = peak_rss_bytes()
    losses, exit_code = fit(run, guard, logger)
    if cfg.train.memory_report:
        write_memory_report(cfg.train.output_dir, launch.rank, rss_before_training, peak_rss_bytes())
    if cfg.data.eval_path and exit_code == 0 and run.progress.step >= run.total_steps:
        logger.log({"step": run.progress.step, "eval_loss": evaluate(run)})
    folder = save(run)
    logger.close()
    plot = plot_loss(logger.path, Path(cfg.train.output_dir) / LOSS_PLOT) if launch.is_main and losses else None
    if launch.is_main:
        print(f"[ds-vicuna] step {run.progress.step}/{run.total_steps}; checkpoint {folder}; "
              f"metrics {logger.path}" + (f"; loss curve {plot}" if plot else ""), flush=True)
        if exit_code == REQUEUE_EXIT_CODE:
            print(f"[ds-vicuna] preempted ({guard.stop_reason()}): saved {folder.name} at step "
                  f"{run.progress.step}, exit {REQUEUE_EXIT_CODE}; the next start with --resume auto continues "
                  "from it", flush=True)
    return TrainResult(progress=run.progress, losses=losses, exit_code=exit_code, checkpoint=folder,
                       engine=run.engine, metrics_path=logger.path, plot_path=plot)
