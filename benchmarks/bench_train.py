"""Real (non-padding) training tokens/s: packing vs FastChat's pad-to-max-length, measured in one run.

    TORCH_EXTENSIONS_DIR=.torch_extensions python benchmarks/bench_train.py              # 3 steps each
    python benchmarks/bench_train.py --steps 5 --ranks 2 --max-length 1024

Both arms run the real trainer (`deepspeed --num_gpus 2 --module ds_vicuna.train`) on CPU with ZeRO-3 + CPU
offload, SmolLM2-135M-Instruct, max length 1024, micro-batch 1 row per rank, on the same skewed length mix
(log-normal, median ~120 tokens, capped at max length, like ShareGPT). Tokens/s counts only real tokens,
from each run's metrics.jsonl, skipping the first (warm-up) step.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the model learns from conversations users shared and answers questions about code science history "
         "travel cooking music math language writing planning").split()


def write_skewed_data(path: Path, n: int, seed: int = 0) -> Path:
    """ShareGPT JSONL with log-normal reply lengths: many short conversations, a few near max length."""
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for i in range(n):
            words = min(700, max(4, int(rng.lognormvariate(4.3, 0.9))))
            question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 20)))
            reply = " ".join(rng.choice(WORDS) for _ in range(words))
            fh.write(json.dumps({"id": f"b{i}", "conversations": [{"from": "human", "value": question},
                                                                  {"from": "gpt", "value": reply}]}) + "\n")
    return path


def run_arm(strategy: str, data: Path, out: Path, args) -> dict:
    """Train `args.steps` steps with one batching strategy; tokens/s from the metrics log."""
    output_dir = out / strategy
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.ranks), "--module",
               "ds_vicuna.train", "--model.name_or_path", "embedded", "--train_path", str(data),
               "--max_length", str(args.max_length), "--batching", strategy, "--micro_batch_size", "1",
               "--global_batch_size", str(args.ranks), "--max_steps", str(args.steps), "--epochs", "1",
               "--save_every", "100000", "--output_dir", str(output_dir),
               "--deepspeed", str(REPO / "ds_configs/zero3_offload.json")]
    print("[bench] " + " ".join(command), flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "loss" in r][1:]  # the first step pays for warm-up
    tokens = sum(r["tokens"] for r in timed)
    seconds = sum(r["step_time_s"] for r in timed)
    return {"strategy": strategy, "steps": len(timed), "real_tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds, "step_s": statistics.median(r["step_time_s"] for r in timed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--out", default=str(REPO / "runs" / "bench_train"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = write_skewed_data(out / "skewed.jsonl", args.samples)
    results = [run_arm(s, data, out, args) for s in ("max", "pack")]
    base, packed = results
    print(f"\n{'batching':<22}{'steps':>6}{'real tokens':>13}{'step s':>9}{'real tok/s':>12}")
    for r, label in ((base, "pad to max (FastChat)"), (packed, "pack (ds-vicuna)")):
        print(f"{label:<22}{r['steps']:>6}{r['real_tokens']:>13}{r['step_s']:>9.1f}{r['tokens_per_s']:>12.1f}")
    print(f"\npacking / padding: {packed['tokens_per_s'] / base['tokens_per_s']:.2f}x real training tokens/s")


if __name__ == "__main__":
    main()
