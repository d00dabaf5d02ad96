"""Training throughput and memory on this machine: FastChat's own trainer vs ds-vicuna, side by side in one run.

    git clone https://github.com/lm-sys/FastChat /tmp/FastChat          # any checkout; nothing is vendored here
    FASTCHAT_SRC=/tmp/FastChat python benchmarks/bench_train.py        # both arms, 4 steps each (~15 min, 2 cores)
    python benchmarks/bench_train.py --fastchat /tmp/FastChat --steps 6 --precision bf16 fp32
    python benchmarks/bench_train.py --arms ds-vicuna                  # ours only (no FastChat checkout needed)

Both arms train SmolLM2-135M-Instruct (the embedded model) on the same synthetic ShareGPT mix (400 conversations,
log-normal reply lengths, median ~120 tokens, a few near max length) with `deepspeed --num_gpus 2` (gloo on CPU),
ZeRO-3 with optimizer + parameter offload, gradient checkpointing, max length 1024, 2 rows per rank per step:

- fastchat: FastChat's `fastchat/train/train.py` itself (HF Trainer, its vicuna template, every sample padded to
  max length, its `playground/deepspeed_config_s3.json`, `--bf16 True` as in its scripts), found at `--fastchat` or
  `$FASTCHAT_SRC`. Two lines are patched at run time (printed; see bench_train_rank.FASTCHAT_PATCHES): its
  label masking, hard-coded for the Llama tokenizer, would otherwise drop whole samples on this tokenizer.
  FastChat's train.py needs nothing beyond this project's environment (torch, transformers + accelerate,
  deepspeed); its import of a module removed in transformers 5 is shimmed. Never add FastChat to setup.py.
- ds-vicuna: `ds_vicuna.train` with `--batching pack` (default) and each `--precision` asked for.

Reported per arm: real (non-padding) tokens/s over the timed steps (the first step is warm-up), s/step, padding
share, and each rank's peak RSS when training ends (before the final save). Run it under the shared lock on a
busy box (`flock /tmp/dsv-heavy.lock ...`); ratios come from one run, absolute figures move with the load.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ds_vicuna.train.metrics import MEMORY_REPORT

REPO = Path(__file__).resolve().parents[1]
RANK_SCRIPT = REPO / "benchmarks" / "bench_train_rank.py"
WORDS = ("the model learns from conversations users shared and answers questions about code science history "
         "travel cooking music math language writing planning").split()
GIB = 1024 ** 3


def write_skewed_data(path: Path, n: int, max_length: int, seed: int = 0) -> Path:
    """ShareGPT JSON (a list, as FastChat reads it) with log-normal reply lengths: many short, a few long, the
    longest fitting max_length (the SmolLM2 tokenizer spends about one token per word here, plus the template)."""
    rng = random.Random(seed)
    longest = max(8, min(700, max_length - 100))
    records = []
    for i in range(n):
        words = min(longest, max(4, int(rng.lognormvariate(4.3, 0.9))))
        question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 20)))
        reply = " ".join(rng.choice(WORDS) for _ in range(words))
        records.append({"id": f"b{i}", "conversations": [{"from": "human", "value": question},
                                                         {"from": "gpt", "value": reply}]})
    path.write_text(json.dumps(records))
    return path


def launcher(args, *target: str) -> list[str]:
    """`deepspeed --num_gpus RANKS` (its runner module, so any venv works) on a free port, running `target`."""
    from ds_vicuna.train.launch_env import free_port

    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.ranks),
            "--master_port", str(free_port()), *target]


def run_launch(command: list[str], log: Path, threads: int, pythonpath: Path | None = None) -> None:
    print(f"[bench] OMP_NUM_THREADS={threads} " + " ".join(command), flush=True)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": str(threads)}
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath), env.get("PYTHONPATH")]))
    started = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(command, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if proc.returncode:
        raise SystemExit(f"[bench] exit {proc.returncode} after {time.perf_counter() - started:.0f} s; see {log}")
    print(f"[bench] done in {time.perf_counter() - started:.0f} s (log {log})", flush=True)


def run_ds_vicuna(precision: str, data: Path, out: Path, args) -> dict:
    """Our trainer with packing, launched as users launch it; tokens/s from its metrics.jsonl, each rank's peak RSS
    from the memory report it writes on request (`train.memory_report`)."""
    name = f"ds-vicuna {precision}"
    folder = out / f"ds-vicuna-{precision}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").unlink(missing_ok=True)
    command = [*launcher(args, "--module", "ds_vicuna.train"), "--memory_report", "true",
               *(["--profile_step", str(args.profile_step)] if args.profile_step else []),
               "--model.name_or_path", str(args.model), "--train_path", str(data),
               "--max_length", str(args.max_length), "--batching", "pack", "--micro_batch_size", str(args.rows),
               "--global_batch_size", str(args.rows * args.ranks), "--max_steps", str(args.steps), "--epochs", "1",
               "--save_every", "100000", "--output_dir", str(folder), "--precision", precision,
               "--deepspeed", str(REPO / "ds_configs/zero3_offload.json"), "--cache_dir", str(out / "cache")]
    run_launch(command, folder / "log.txt", args.threads)
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "loss" in r][1:]  # the first step pays for warm-up
    fed = len(timed) * args.rows * args.ranks * args.max_length
    per_rank = [json.loads((folder / MEMORY_REPORT.format(rank=r)).read_text()) for r in range(args.ranks)]
    return summarize(name, [r["step_time_s"] for r in timed], [r["tokens"] for r in timed], fed, per_rank)


def fastchat_deepspeed_config(source: Path, folder: Path) -> Path:
    """FastChat's playground/deepspeed_config_s3.json plus an optimizer section.

    With it as written, HF Trainer hands DeepSpeed a torch AdamW, which current DeepSpeed refuses under optimizer
    offload (`zero_force_ds_cpu_optimizer`); the section makes DeepSpeed build DeepSpeedCPUAdam (HF fills the
    "auto" values from the training arguments), the optimizer our arm uses too.
    """
    ds = json.loads((source / "playground" / "deepspeed_config_s3.json").read_text())
    ds["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                    "weight_decay": "auto"}}
    path = folder / "deepspeed_config_s3.json"
    path.write_text(json.dumps(ds, indent=2))
    return path


def run_fastchat(precision: str, source: Path, data: Path, out: Path, args) -> dict:
    """FastChat's train.py (padded to max length, HF Trainer, its ZeRO-3 offload config)."""
    folder = out / f"fastchat-{precision}"
    stats = folder / "stats"
    stats.mkdir(parents=True, exist_ok=True)
    command = [*launcher(args, str(RANK_SCRIPT)), str(stats), str(source), "--",
               "--model_name_or_path", str(args.model), "--data_path", str(data),
               "--bf16", str(precision == "bf16"), "--output_dir", str(folder / "out"), "--num_train_epochs", "1",
               "--per_device_train_batch_size", str(args.rows), "--gradient_accumulation_steps", "1",
               "--save_strategy", "no", "--learning_rate", "2e-5", "--weight_decay", "0.", "--warmup_steps", "0.04",
               "--lr_scheduler_type", "cosine", "--logging_steps", "1", "--model_max_length", str(args.max_length),
               "--gradient_checkpointing", "True", "--lazy_preprocess", "True", "--max_steps", str(args.steps),
               "--deepspeed", str(fastchat_deepspeed_config(source, folder)), "--report_to", "none",
               "--dataloader_num_workers", "0", "--seed", "42"]
    run_launch(command, folder / "log.txt", args.threads, pythonpath=source)  # its `fastchat` package
    per_rank = [json.loads((stats / f"rank{r}.json").read_text()) for r in range(args.ranks)]
    ends = per_rank[0]["step_end_s"]
    step_times = [b - a for a, b in zip(ends, ends[1:])]  # from the end of step 1: the first step is warm-up
    tokens = [sum(r["step_tokens"][i] for r in per_rank) for i in range(1, len(ends))]
    fed = len(step_times) * args.rows * args.ranks * args.max_length
    return summarize(f"FastChat {precision}", step_times, tokens, fed, per_rank)


def summarize(name: str, step_times: list[float], tokens: list[int], fed: int, per_rank: list[dict]) -> dict:
    if not step_times:
        raise SystemExit(f"[bench] {name}: no timed step; use --steps 2 or more")
    return {"arm": name, "steps": len(step_times), "real_tokens": sum(tokens), "padding": 1 - sum(tokens) / fed,
            "step_s": statistics.median(step_times), "tokens_per_s": sum(tokens) / sum(step_times),
            "peak_rss_gib": [r["peak_rss_bytes"] / GIB for r in per_rank],
            "peak_rss_before_training_gib": [r["peak_rss_before_training_bytes"] / GIB for r in per_rank]}


def find_fastchat(given: str | None) -> Path:
    source = given or os.environ.get("FASTCHAT_SRC")
    if not source:
        raise SystemExit("bench_train: the fastchat arm needs a FastChat checkout: --fastchat PATH or "
                         "FASTCHAT_SRC=PATH (git clone https://github.com/lm-sys/FastChat); or --arms ds-vicuna")
    path = Path(source).expanduser().resolve()
    for needed in ("fastchat/train/train.py", "playground/deepspeed_config_s3.json"):
        if not (path / needed).is_file():
            raise SystemExit(f"bench_train: {path / needed} not found: --fastchat must be a FastChat checkout")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arms", nargs="+", default=["fastchat", "ds-vicuna"], choices=["fastchat", "ds-vicuna"])
    parser.add_argument("--fastchat", help="FastChat checkout (default: $FASTCHAT_SRC)")
    parser.add_argument("--precision", nargs="+", default=["bf16"], choices=["bf16", "fp32"],
                        help="one run of each arm per precision")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per arm (the first is not timed)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--rows", type=int, default=2, help="rows (samples for FastChat) per rank per step")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--model", help="HF model folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--out", default=str(REPO / "runs" / "bench_train"))
    parser.add_argument("--threads", type=int,
                        help="OMP_NUM_THREADS of every rank of both arms (default: cores / ranks)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--profile-step", type=int,
                        help="ds-vicuna: profile this step (train.profile_step: OUT/ds-vicuna-*/profile_rank*.txt)")
    args = parser.parse_args()
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.ranks)
    if not args.model:
        from ds_vicuna.model.embedded import embedded_model_path

        args.model = embedded_model_path()
    source = find_fastchat(args.fastchat) if "fastchat" in args.arms else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = write_skewed_data(out / "skewed.json", args.samples, args.max_length)
    results, pairs = [], []
    for precision in args.precision:
        base = run_fastchat(precision, source, data, out, args) if source is not None else None
        ours = run_ds_vicuna(precision, data, out, args) if "ds-vicuna" in args.arms else None
        results += [r for r in (base, ours) if r is not None]
        if base and ours:
            pairs.append((base, ours))
    print(f"\n{'arm':<24}{'steps':>6}{'real tokens':>13}{'padding':>9}{'s/step':>9}{'real tok/s':>12}"
          f"{'peak RSS/rank GiB':>20}{'(at start)':>14}")
    for r in results:
        rss = " / ".join(f"{x:.2f}" for x in r["peak_rss_gib"])
        start = " / ".join(f"{x:.2f}" for x in r["peak_rss_before_training_gib"])
        print(f"{r['arm']:<24}{r['steps']:>6}{r['real_tokens']:>13}{r['padding']:>9.0%}{r['step_s']:>9.1f}"
              f"{r['tokens_per_s']:>12.1f}{rss:>20}{start:>14}")
    for base, ours in pairs:
        print(f"{ours['arm']} / {base['arm']}: {ours['tokens_per_s'] / base['tokens_per_s']:.2f}x real tokens/s, "
              f"{max(ours['peak_rss_gib']) / max(base['peak_rss_gib']):.2f}x peak RSS per rank")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
