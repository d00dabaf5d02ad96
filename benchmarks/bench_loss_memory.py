"""Peak memory of the loss: chunked lm_head + cross-entropy (ds_vicuna.train.loss, the default) vs plain logits.

    python benchmarks/bench_loss_memory.py                                 # CPU, fp32: peak RSS, 2048 tokens
    python benchmarks/bench_loss_memory.py --device cuda --json out.json   # GPU, bf16: max allocated, 16384 tokens

One forward + backward of `token_loss_sum` on a 2-layer Llama with Llama 3's 128,256-token vocabulary (hidden 256
on CPU, 1024 on GPU), one packed row with labels on 3 tokens of 4. Each arm runs in its own process; the figure
is the peak above what the model and the batch already hold (CPU: the process's peak RSS, reset through
/proc/self/clear_refs before the step; GPU: torch.cuda.max_memory_allocated after reset_peak_memory_stats).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

VOCAB = 128_256


def rss_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def run_arm(device: str, tokens: int, hidden: int, chunk: int | None) -> dict:
    """One forward + backward; the peak memory above the model and batch (MiB) and the time it took."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ds_vicuna.train.loss import token_loss_sum

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
                         max_position_embeddings=tokens, tie_word_embeddings=False, use_cache=False)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    ids = torch.randint(0, VOCAB, (1, tokens), device=device)  # [1, T]
    labels = ids.clone()
    labels[:, ::4] = -100  # [1, T]: a quarter of the tokens (prompts) carry no label
    batch = {"input_ids": ids, "labels": labels, "position_ids": torch.arange(tokens, device=device)[None]}
    for p in model.parameters():  # the gradient buffers exist in training anyway: count them in the baseline
        p.grad = torch.zeros_like(p)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
        before = rss_mib("VmRSS")
    started = time.perf_counter()
    loss = token_loss_sum(model, batch, chunk)
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = rss_mib("VmHWM")
    return {"loss": "plain (whole logits)" if chunk is None else f"chunked ({chunk} tokens)",
            "peak_mib": peak - before, "seconds": time.perf_counter() - started, "value": float(loss)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--tokens", type=int, help="row length (default 2048 on CPU, 16384 on GPU)")
    parser.add_argument("--hidden", type=int, help="hidden size (default 256 on CPU, 1024 on GPU)")
    parser.add_argument("--chunk", type=int, default=1024, help="train.loss_chunk_tokens of the chunked arm")
    parser.add_argument("--json", help="write the results here too")
    parser.add_argument("--arm", help=argparse.SUPPRESS)  # internal: run one arm in this process
    args = parser.parse_args()
    tokens = args.tokens or (16384 if args.device == "cuda" else 2048)
    hidden = args.hidden or (1024 if args.device == "cuda" else 256)
    if args.arm is not None:
        print(json.dumps(run_arm(args.device, tokens, hidden, None if args.arm == "plain" else int(args.arm))))
        return
    arms = []
    for arm in ("plain", str(args.chunk)):
        command = [sys.executable, __file__, "--device", args.device, "--tokens", str(tokens), "--hidden",
                   str(hidden), "--arm", arm]
        proc = subprocess.run(command, capture_output=True, text=True, check=True)
        arms.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    plain, chunked = arms
    assert abs(plain["value"] - chunked["value"]) <= 1e-3 * abs(plain["value"]), arms  # same loss
    dtype = "bf16" if args.device == "cuda" else "fp32"
    shape = f"{tokens} tokens x {VOCAB} vocabulary, hidden {hidden}, {dtype} on {args.device}"
    print(f"loss peak memory above model + batch ({shape}):")
    for arm in arms:
        print(f"  {arm['loss']:<24} {arm['peak_mib']:>9.0f} MiB  {arm['seconds']:6.2f} s")
    ratio = plain["peak_mib"] / max(chunked["peak_mib"], 1e-9)
    print(f"chunked uses {ratio:.1f}x less memory for the loss step")
    if args.json:
        Path(args.json).write_text(json.dumps({"shape": shape, "arms": arms, "ratio": ratio}, indent=2) + "\n")


if __name__ == "__main__":
    main()
