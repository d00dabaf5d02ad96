"""LoRA vs full fine-tuning, and many adapters served over one base vs one merged model: side by side in one run.

    python benchmarks/bench_lora.py                        # both parts (~15 min on 2 busy cores)
    python benchmarks/bench_lora.py --parts serve          # serving only (~2 min)
    python benchmarks/bench_lora.py --steps 4 --rank 16 --concurrency 8 --adapters 4

Training: SmolLM2-135M-Instruct (the embedded model), `deepspeed --num_gpus 2`, ZeRO-3 with optimizer + parameter
offload, packing, gradient checkpointing, the same synthetic ShareGPT mix (bench_train.write_skewed_data) for
both arms: full fine-tuning, then LoRA rank --rank on every linear projection (model.lora, alpha = 2 x rank).
Reported per arm: each rank's peak RSS at the end of training, real tokens/s over the timed steps (the first is
warm-up) and the size of the final checkpoint folder.

Serving: the same base in one process, `serve.engine.BatchEngine` as the worker runs it, --concurrency greedy
requests of --max-tokens each: (a) one merged model (base + one adapter, merged), (b) the base with --adapters
random rank --rank adapters installed (`serve.multi_lora`), the requests spread over all of them so every batch
mixes adapters. Reported: generated tokens/s of each, and (b)/(a) (goal >= 0.8). The arms alternate, --repeats
times each; the median counts.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

# run as a script, this folder is on sys.path: bench_train is its sibling
from bench_train import REPO, launcher, run_launch, summarize, write_skewed_data

from ds_vicuna.train.metrics import MEMORY_REPORT

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain recursion simply.",
             "Name three colours.", "How do I boil an egg?", "What is 17 times 3?", "Tell me a short joke.",
             "Why is the sky blue?"]


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def train_arm(name: str, extra: list[str], data: Path, out: Path, args) -> dict:
    """One training run as users launch it; tokens/s from metrics.jsonl, RSS from the memory report."""
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    command = [*launcher(args, "--module", "ds_vicuna.train"), "--memory_report", "true",
               "--model.name_or_path", "embedded", "--train_path", str(data), "--max_length", str(args.max_length),
               "--batching", "pack", "--micro_batch_size", str(args.rows),
               "--global_batch_size", str(args.rows * args.ranks), "--max_steps", str(args.steps), "--epochs", "1",
               "--save_every", "100000", "--output_dir", str(folder), "--precision", "fp32",
               "--deepspeed", str(REPO / "ds_configs/zero3_offload.json"), "--cache_dir", str(out / "cache"), *extra]
    run_launch(command, folder / "log.txt", args.threads)
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "loss" in r][1:]
    fed = len(timed) * args.rows * args.ranks * args.max_length
    per_rank = [json.loads((folder / MEMORY_REPORT.format(rank=r)).read_text()) for r in range(args.ranks)]
    result = summarize(name, [r["step_time_s"] for r in timed], [r["tokens"] for r in timed], fed, per_rank)
    checkpoint = folder / (folder / "latest").read_text().strip()
    result["checkpoint_mb"] = folder_bytes(checkpoint) / 1e6
    result["slowest_step_s"] = max(r["step_time_s"] for r in timed)
    return result


def bench_training(args, out: Path) -> list[dict]:
    data = write_skewed_data(out / "train.json", 200, args.max_length)
    lora = ["--model.lora", json.dumps({"r": args.rank, "alpha": 2 * args.rank})]
    rows = [train_arm("full", [], data, out, args), train_arm(f"lora-r{args.rank}", lora, data, out, args)]
    print("\n| arm | peak RSS per rank (GiB) | real tokens/s | median s/step | slowest step s | checkpoint (MB) |\n"
          "|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arm']} | {', '.join(f'{g:.2f}' for g in r['peak_rss_gib'])} | {r['tokens_per_s']:.0f} | "
              f"{r['step_s']:.2f} | {r['slowest_step_s']:.1f} | {r['checkpoint_mb']:.1f} |")
    full, lora_row = rows
    print(f"LoRA / full: RSS {max(lora_row['peak_rss_gib']) / max(full['peak_rss_gib']):.2f}x, tokens/s "
          f"{lora_row['tokens_per_s'] / full['tokens_per_s']:.2f}x (by median step time "
          f"{full['step_s'] / lora_row['step_s']:.2f}x), "
          f"checkpoint {lora_row['checkpoint_mb'] / full['checkpoint_mb']:.4f}x")
    return rows


def random_adapters(base_dir: Path, out: Path, count: int, rank: int) -> list[Path]:
    """`count` random LoRA adapters on every linear projection, saved by peft."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folders = []
    for i in range(count):
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        torch.manual_seed(i)
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear",
                                                 init_lora_weights=False))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.mul_(0.01)
        model.save_pretrained(out / f"adapter{i}")
        folders.append(out / f"adapter{i}")
    return folders


def generation_rate(engine, prompts: list[list[int]], adapters: list[str | None], max_tokens: int) -> float:
    from ds_vicuna.serve.jobs import GenerationJob
    from ds_vicuna.serve.sampling import SamplingParams
    from ds_vicuna.serve.worker_events import DoneEvent

    # the engines have no stop ids: every request generates max_tokens
    jobs = [GenerationJob(p, SamplingParams(max_tokens=max_tokens, temperature=0.0), adapter=a)
            for p, a in zip(prompts, adapters)]
    started = time.perf_counter()
    engine.run_batch(jobs)
    wall = time.perf_counter() - started
    tokens = 0
    for job in jobs:
        while not job.events.empty():
            event = job.events.get_nowait()
            if isinstance(event, DoneEvent):
                tokens += event.completion_tokens
    return tokens / wall


def bench_serving(args, out: Path) -> dict:
    import torch

    from ds_vicuna.model.adapters import load_adapter, merge_into
    from ds_vicuna.model.embedded import resolve_model_path
    from ds_vicuna.model.loading import load_chat_model
    from ds_vicuna.serve.engine import BatchEngine
    from ds_vicuna.serve.multi_lora import install_adapters

    torch.set_num_threads(args.threads * args.ranks)
    base_dir = resolve_model_path("embedded")
    folders = random_adapters(base_dir, out, args.adapters, args.rank)
    merged = load_chat_model("embedded", device="cpu")
    merge_into(merged.model, load_adapter("a0", folders[0], merged.model))
    multi = load_chat_model("embedded", device="cpu")
    names = [f"a{i}" for i in range(len(folders))]
    routing = install_adapters(multi.model, [load_adapter(n, f, multi.model) for n, f in zip(names, folders)])
    prompts = [merged.encoder.encode_prompt([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}])
               for i in range(args.concurrency)]
    engines = {"merged": (BatchEngine(merged.model, merged.tokenizer, [], args.concurrency), [None] * len(prompts)),
               "multi": (BatchEngine(multi.model, multi.tokenizer, [], args.concurrency, routing=routing),
                         [names[i % len(names)] for i in range(len(prompts))])}
    rates = {name: [] for name in engines}
    for repeat in range(args.repeats):
        for name, (engine, adapters) in engines.items():
            rates[name].append(generation_rate(engine, prompts, adapters, args.max_tokens))
            print(f"[bench] serve {name} repeat {repeat + 1}: {rates[name][-1]:.1f} tokens/s", flush=True)
    result = {name: statistics.median(values) for name, values in rates.items()}
    result["ratio"] = result["multi"] / result["merged"]
    print(f"\nserving, {args.concurrency} concurrent greedy requests x {args.max_tokens} tokens: one merged model "
          f"{result['merged']:.1f} tokens/s; {args.adapters} adapters (rank {args.rank}) mixed in every batch "
          f"{result['multi']:.1f} tokens/s; ratio {result['ratio']:.2f} (goal >= 0.8)")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", nargs="+", choices=("train", "serve"), default=["train", "serve"])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--rows", type=int, default=1, help="rows per rank per step")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per rank")
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", help="keep runs here (default: a temporary folder)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp:
        out = Path(args.workdir or tmp)
        out.mkdir(parents=True, exist_ok=True)
        if "train" in args.parts:
            bench_training(args, out)
        if "serve" in args.parts:
            bench_serving(args, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
