"""Training throughput and MFU on one GPU: the real loop (`ds_vicuna.train.setup` + `fit`) on a ~1.2B
Llama-shaped random model, bf16, packing, ZeRO-3 with and without CPU offload, max length 2048 and 4096.

    python benchmarks/bench_gpu_train.py --tokenizer .gpu_wheels/tokenizer --json bench_train.json   # every arm
    python benchmarks/bench_gpu_train.py --arms 4096:zero3:sdpa 4096:zero3:flex_attention --steps 30

Model: TinyLlama-1.1B's shape (hidden 2048, 22 layers, 32 heads, 4 KV heads, MLP 5632) with the SmolLM2
tokenizer (49,152 tokens + the template's), untied, random weights written once to --work-dir (no weights travel).
Data: 2500 synthetic ShareGPT-like conversations (1-6 exchanges, log-normal turn lengths, a long tail up to the
max length), tokenized with the vicuna_v1.1 template and packed into rows of max length. Each arm trains
`--steps` optimizer steps (15; 6 with offload, where the CPU optimizer dominates), each of `--tokens-per-step` packed
tokens (micro-batch rows x accumulation), gradient checkpointing off, and runs in its own process (no checkpoint is
written). Figures skip the first `--warmup` steps: real (non-padding) tokens/s, and MFU = model FLOPs (6 x matmul
parameters x tokens + attention, `train_metrics.step_flops`) / time / the GPU's dense bf16 peak.
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARM_FAILED, NOTHING_MEASURED = 1, 3  # exit codes: an arm errored; no CUDA device and no --tiny
# the opening is gpu_check.HARDWARE_SKIP: an arm this machine cannot run, which the GPU check does not count
CPU_FLEX_SKIP = "not on this machine: flex_attention training needs CUDA (torch 2.13's FlexAttention has no " \
    "backward on CPU)"
ARMS = ("2048:zero3:sdpa", "4096:zero3:sdpa", "4096:zero3:flex_attention", "2048:zero3_offload:sdpa",
        "4096:zero3_offload:sdpa")
SHAPE = "1b"  # ds_vicuna.model.random_weights.SHAPES: TinyLlama-1.1B's shape
TINY = "tiny"  # --tiny: the same plumbing on CPU in seconds (tests/gpu/test_gpu_check.py, make gpu-rehearsal)
WORDS = ("the model learns from conversations users shared and answers questions about code science history "
         "travel cooking music math language writing planning python function error install server data "
         "table chart memory speed explain example because however therefore first second finally").split()


def write_sharegpt_like(path: Path, n: int, max_words: int, seed: int = 0) -> Path:
    """ShareGPT JSONL: 1-6 exchanges, log-normal question/answer lengths (median ~20 / ~150 words), at most
    `max_words` words per conversation (the trainer refuses samples longer than max length)."""
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for i in range(n):
            turns, budget = [], max_words
            for _ in range(min(6, 1 + int(rng.expovariate(0.8)))):
                question = min(budget // 4, max(2, int(rng.lognormvariate(3.0, 0.8))))
                answer = min(budget - question, max(2, int(rng.lognormvariate(5.0, 0.8))))
                if question < 2 or answer < 2:
                    break
                budget -= question + answer
                for role, words in (("human", question), ("gpt", answer)):
                    turns.append({"from": role, "value": " ".join(rng.choice(WORDS) for _ in range(words))})
            fh.write(json.dumps({"id": f"g{i}", "conversations": turns}) + "\n")
    return path


def build_model_in_child(folder: Path, tokenizer_dir: Path, tiny: bool) -> None:
    """The random model, written once by a child process: the parent never touches the GPU, so no arm shares it
    with memory the parent holds (a model built here kept ~7 GiB reserved through every arm).

    Raises:
        RuntimeError: the child failed, with its last output.
    """
    command = [sys.executable, __file__, "--build-model", str(folder), "--tokenizer", str(tokenizer_dir)]
    proc = subprocess.run(command + (["--tiny"] if tiny else []), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"building the model in {folder} failed:\n{proc.stderr[-3000:]}")


def write_model(folder: Path, tokenizer_dir: Path, tiny: bool) -> Path:
    """The ~1.2B Llama (bf16 on a GPU, random init there) or the tiny one (fp32 on CPU) over the tokenizer."""
    import torch

    from ds_vicuna.model.random_weights import write_random_llama

    cuda = torch.cuda.is_available()
    return write_random_llama(folder, tokenizer_dir, TINY if tiny else SHAPE, dtype="bf16" if cuda else "fp32",
                              max_positions=8192)


def run_arm(arm: str, model: Path, data: Path, work: Path, args) -> dict:
    """Train one arm in this process with the real loop; the timed steps' figures."""
    import torch

    from ds_vicuna.config import load_config
    from ds_vicuna.train.launch_env import init_distributed
    from ds_vicuna.train.preemption import PreemptionGuard
    from ds_vicuna.train.loop import fit, preflight, setup
    from ds_vicuna.train.metrics import MetricsLogger

    max_length, deepspeed, attn = arm.split(":")
    offload = "offload" in deepspeed
    steps = args.offload_steps if offload else args.steps
    rows = max(1, args.tokens_per_step // int(max_length))
    micro = max(1, min(rows, args.micro_tokens // int(max_length)))
    out = work / arm.replace(":", "_")
    cfg = load_config(None, [
        "--model.name_or_path", str(model), "--attn_implementation", attn, "--gradient_checkpointing", "false",
        "--train_path", str(data), "--max_length", max_length, "--batching", "pack",
        "--cache_dir", str(work / f"cache_{max_length}"), "--micro_batch_size", str(micro),
        "--global_batch_size", str(micro * max(1, rows // micro)), "--max_steps", str(steps), "--epochs", "1",
        "--save_every", "1000000", "--learning_rate", "1e-5", "--warmup_ratio", "0", "--precision", "auto",
        "--deepspeed", str(REPO / "ds_configs" / f"{deepspeed}.json"), "--output_dir", str(out)])
    launch = init_distributed()
    run = setup(cfg, preflight(cfg), launch)
    with PreemptionGuard() as guard:
        logger = MetricsLogger(out, enabled=True)
        fit(run, guard, logger)
        logger.close()
    records = [json.loads(line) for line in logger.path.read_text().splitlines() if "loss" in line]
    timed = records[args.warmup:]
    seconds = sum(r["step_time_s"] for r in timed)
    result = {"arm": arm, "max_length": int(max_length), "deepspeed": deepspeed, "attn": attn,
              "micro_batch_rows": micro, "accumulation": run.grad_accum, "steps_timed": len(timed),
              "tokens_per_s": sum(r["tokens"] for r in timed) / seconds if seconds else None,
              "step_s": seconds / len(timed) if timed else None,
              "mfu": (sum(r["mfu"] * r["step_time_s"] for r in timed) / seconds) if seconds and "mfu" in timed[0]
              else None,
              "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "losses": [round(r["loss"], 4) for r in records]}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", default=None, help="SmolLM2 tokenizer folder (default: $DS_VICUNA_TOKENIZER, "
                        "else the embedded model's)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), help="MAX_LENGTH:DS_CONFIG:ATTENTION")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--offload-steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--tokens-per-step", type=int, default=16384)
    parser.add_argument("--micro-tokens", type=int, default=8192, help="packed tokens per forward pass")
    parser.add_argument("--conversations", type=int, default=2500)
    parser.add_argument("--work-dir", default="/tmp/ds_vicuna_bench_gpu")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model, allowed on CPU: checks the plumbing")
    parser.add_argument("--json", help="write the results here too")
    parser.add_argument("--arm", help=argparse.SUPPRESS)  # internal: run one arm in this process
    parser.add_argument("--build-model", help=argparse.SUPPRESS)  # internal: write the model in this process
    args = parser.parse_args(argv)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    from ds_vicuna.model.random_weights import bundled_tokenizer_dir

    tokenizer = Path(args.tokenizer) if args.tokenizer else bundled_tokenizer_dir()
    if args.build_model:
        write_model(Path(args.build_model), tokenizer, args.tiny)
        return 0
    if args.arm:
        result = run_arm(args.arm, work / "model", work / "sharegpt_like.jsonl", work, args)
        print("BENCH_RESULT " + json.dumps(result), flush=True)
        return 0
    bad = [arm for arm in args.arms if len(arm.split(":")) != 3 or not arm.split(":")[0].isdigit()]
    if bad:
        parser.error(f"--arms {' '.join(bad)}: each arm is MAX_LENGTH:DS_CONFIG:ATTENTION, e.g. 4096:zero3:sdpa")
    import torch  # is_available asks the driver (NVML) and makes no CUDA context here

    if not torch.cuda.is_available() and not args.tiny:
        print("bench_gpu_train: no CUDA device; nothing measured (--tiny runs the plumbing on CPU)", file=sys.stderr)
        if args.json:
            Path(args.json).write_text(json.dumps({"skipped": "no CUDA device", "arms": []}) + "\n")
        return NOTHING_MEASURED
    build_model_in_child(work / "model", tokenizer, args.tiny)
    shortest = min(int(arm.split(":")[0]) for arm in args.arms)
    write_sharegpt_like(work / "sharegpt_like.jsonl", args.conversations, max_words=min(1700, shortest // 2))
    results = []
    for arm in args.arms:
        started = time.monotonic()
        command = [sys.executable, __file__, "--arm", arm, "--work-dir", str(work),
                   *[f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
                     ("steps", "offload_steps", "warmup", "tokens_per_step", "micro_tokens")]]
        max_length, deepspeed, attn = arm.split(":")
        if attn == "flex_attention" and not torch.cuda.is_available():
            results.append({"arm": arm, "max_length": int(max_length), "deepspeed": deepspeed, "attn": attn,
                            "skipped": CPU_FLEX_SKIP})
            print(f"{arm}: {CPU_FLEX_SKIP}", flush=True)
            continue
        proc = subprocess.run(command, capture_output=True, text=True)
        found = [line for line in proc.stdout.splitlines() if line.startswith("BENCH_RESULT ")]
        if proc.returncode == 0 and found:
            result = json.loads(found[-1][len("BENCH_RESULT "):])
        else:
            result = {"arm": arm, "max_length": int(max_length), "deepspeed": deepspeed, "attn": attn,
                      "error": f"exit {proc.returncode}: " + (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
            print(proc.stderr[-4000:], file=sys.stderr)
        result["wall_s"] = round(time.monotonic() - started, 1)
        results.append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "losses"}), flush=True)
        summary = {"model": "Llama ~1.2B (TinyLlama shape, SmolLM2 vocabulary), bf16, packing, 1 GPU"
                   if not args.tiny else "tiny Llama (plumbing check)",
                   "device": next((r["device"] for r in results if r.get("device")), "?"), "arms": results}
        if args.json:  # after every arm: a run stopped by its time budget keeps what it measured
            Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n{'arm':<28}{'tok/s/GPU':>11}{'MFU':>8}{'peak GiB':>10}")
    for r in results:
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        tps = f"{r['tokens_per_s']:.0f}" if r.get("tokens_per_s") else "-"
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") else "-"
        print(f"{r['arm']:<28}{tps:>11}{mfu:>8}{peak:>10}  {r.get('error', '')}")
    errors = [r["arm"] for r in results if r.get("error")]
    if errors:
        print(f"bench_gpu_train: {len(errors)} arm(s) failed: {' '.join(errors)}", file=sys.stderr)
        return ARM_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
