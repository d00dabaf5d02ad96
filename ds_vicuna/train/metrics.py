"""What the trainer reports: the metrics log (JSONL + TensorBoard), the loss plot, MFU, the progress bar, and on
request (`train.memory_report`, `train.profile_step`) each rank's peak RSS and one step's operator profile.

    logger = MetricsLogger(output_dir, enabled=is_main); logger.log({"step": 1, "loss": 2.3}); logger.close()
    plot_loss(output_dir / METRICS_FILE, output_dir / LOSS_PLOT)
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss.png"
MEMORY_REPORT = "memory_rank{rank}.json"
PROFILE_REPORT = "profile_rank{rank}.txt"
# Dense (no sparsity) bf16 peak FLOP/s by GPU name fragment, for MFU; the first fragment found in the device name
# wins, so the more specific come first (no entry: MFU not logged).
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H200", 989e12), ("H100", 989e12), ("H800", 989e12),
                   ("H20", 148e12), ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12),
                   ("A10G", 125e12), ("L4", 121e12), ("A6000", 155e12), ("4090", 165e12), ("V100", 125e12))


def peak_flops(precision: str, device_name: str | None = None) -> float | None:
    """Dense peak FLOP/s of this GPU (or `device_name`) for `precision` (fp32 counted as TF32 ~ half), or None."""
    if device_name is None:
        import torch

        device_name = torch.cuda.get_device_name()
    for fragment, flops in PEAK_BF16_FLOPS:
        if fragment in device_name:
            return flops / 2 if precision == "fp32" else flops
    return None


def matmul_params(model) -> int:
    """Parameters that do a multiply-add per token: all but the input embedding table (a lookup), unless the
    output layer shares it. What the 6*N of `step_flops` counts (PaLM and torchtitan count the same)."""
    def numel(p):
        return getattr(p, "ds_numel", p.numel())  # ZeRO-3 partitions hold the full size in ds_numel

    total = sum(numel(p) for p in model.parameters())
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embedding
    return total if tied else total - numel(embedding)


def step_flops(run, sample_lengths: list[int]) -> float:
    """Model FLOPs of one step: 6*N per token (N = `matmul_params`) plus attention 12*layers*hidden*len per
    token (PaLM's count: recomputation by gradient checkpointing is not model work and is not counted)."""
    layers, hidden = run.model_config.num_hidden_layers, run.model_config.hidden_size
    tokens = sum(sample_lengths)
    return 6 * run.matmul_params * tokens + 12 * layers * hidden * sum(n * n for n in sample_lengths)


def describe_engine(run) -> str:
    """One line: ZeRO stage, optimizer and where it lives, precision, batch shape, size of the run."""
    engine = run.engine
    where = {}
    for name, offload in (("offload_optimizer", engine.zero_offload_optimizer()),
                          ("offload_param", engine.zero_offload_param())):
        device = getattr(offload, "device", None)
        where[name] = getattr(device, "value", device) or "none"
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    return (f"ZeRO stage {engine.zero_optimization_stage()}, optimizer {type(inner).__name__} "
            f"(offload optimizer: {where['offload_optimizer']}, params: {where['offload_param']}), "
            f"{run.precision}, {run.launch.world_size} rank(s)"
            + (f" (sequence parallel over {run.sp_size})" if run.sp_size > 1 else "")
            + f" x micro-batch {run.cfg.train.micro_batch_size} x "
            f"accumulation {run.grad_accum}, {_parameters(run)}, {run.total_steps} steps")


def _parameters(run) -> str:
    """"135.0M parameters", or with LoRA "1.8M trainable of 136.9M parameters (1.35%)"."""
    if run.trainable_params == run.num_params:
        return f"{run.num_params / 1e6:.1f}M parameters"
    return (f"{run.trainable_params / 1e6:.2f}M trainable of {run.num_params / 1e6:.1f}M parameters "
            f"({100 * run.trainable_params / max(run.num_params, 1):.2f}%)")


def progress_bar(run):
    """tqdm on rank 0 (step, loss, lr, tokens/s, ETA); None elsewhere."""
    if not run.launch.is_main:
        return None
    from tqdm import tqdm

    return tqdm(total=run.total_steps, initial=run.progress.step, desc="train", unit="step", dynamic_ncols=True)


def drop_records_after(path: Path, step: int) -> int:
    """Remove the records of steps after `step` from a metrics file (steps a resumed run will train again), so
    no step appears twice. Returns how many were removed."""
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a last line cut short by a crash
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    if len(kept) != len(lines):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
    return len(lines) - len(kept)


class MetricsLogger:
    """JSONL always (rank 0), TensorBoard when installed; other ranks log nothing. A resumed run starts the
    file over after `start_step`: the records of steps it trains again are replaced, never duplicated."""

    def __init__(self, output_dir: str | Path, enabled: bool, start_step: int = 0):
        self.enabled = enabled
        self.path = Path(output_dir) / METRICS_FILE
        self.tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            drop_records_after(self.path, start_step)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))
            except ImportError:
                self.tb = None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def plot_loss(metrics_path: str | Path, png_path: str | Path) -> Path | None:
    """Training (and eval) loss against step as a PNG; None when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train), label="train loss (mean over assistant tokens)")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return Path(png_path)


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far, in bytes (Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def write_memory_report(output_dir: str | Path, rank: int, before_training: int, after_training: int) -> Path:
    """output_dir/memory_rank<R>.json with this rank's peak RSS when the loop started and when it ended."""
    path = Path(output_dir) / MEMORY_REPORT.format(rank=rank)
    path.write_text(json.dumps({"rank": rank, "peak_rss_before_training_bytes": before_training,
                                "peak_rss_bytes": after_training}) + "\n")
    return path


@contextlib.contextmanager
def step_profile(output_dir: str | Path, rank: int, enabled: bool):
    """When `enabled`, profile the block with torch.profiler and write its operator table to
    output_dir/profile_rank<R>.txt; otherwise do nothing."""
    if not enabled:
        yield
        return
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities, with_stack=False) as prof:
        yield
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=45, max_name_column_width=70)
    (Path(output_dir) / PROFILE_REPORT.format(rank=rank)).write_text(table)
