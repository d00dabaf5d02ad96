"""Attention over packed rows: the dense-mask path vs what the trainer uses instead.

    python benchmarks/bench_packed_attention.py                          # CPU: forward at 2048 4096 8192 tokens
    python benchmarks/bench_packed_attention.py --legacy                 # the old table: masked SDPA vs PACKED_SDPA,
                                                                         # fwd+bwd, SmolLM2's heads, 2 rows of 1024

Default: one packed row of T tokens (ShareGPT-like conversation lengths), the ~1.2B shape's heads (32 query heads,
4 KV heads, head dim 64), fp32, forward only (torch 2.13's FlexAttention has no backward on CPU), each arm in its
own process so its peak RSS above the inputs is its own:
- dense mask: transformers' SDPA with the [1, 1, T, T] document-causal mask it builds from position_ids (what
  packed rows on a GPU went through before: KV heads repeated, every T^2 score computed);
- flex_attention: `torch.compile(flex_attention)` with a document-causal BlockMask and enable_gqa (what packed rows
  use on CUDA now; `ds_vicuna.train.build.pick_training_attention`), compiled once per shape before timing;
- PACKED_SDPA: one causal SDPA per conversation (what packed rows use on CPU).
All three outputs are compared (max abs difference) before the figures are printed.
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROWS = [[700, 150, 100, 50, 24], [300, 250, 200, 120, 100, 54]]  # --legacy: conversation lengths in 2 rows of 1024
ARMS = ("dense_mask", "flex_attention", "packed_sdpa")


def timed(fn, repeat: int) -> float:
    fn()  # warm-up
    started = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - started) / repeat


def conversation_lengths(tokens: int, seed: int = 0) -> list[int]:
    """ShareGPT-like lengths (log-normal, median ~300 tokens, up to 2000) filling `tokens` exactly."""
    rng, lengths = random.Random(seed), []
    while sum(lengths) < tokens:
        lengths.append(min(tokens - sum(lengths), max(8, min(2000, int(rng.lognormvariate(5.7, 0.9))))))
    return lengths


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/self/status has no VmHWM")


def run_arm(arm: str, tokens: int, heads: int, kv_heads: int, head_dim: int, repeat: int) -> dict:
    """One arm at one length in this process: forward time, peak RSS above the inputs, an output checksum."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from ds_vicuna.train.packed_attention import packed_sdpa_attention

    lengths = conversation_lengths(tokens)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, tokens, head_dim, generator=gen)  # [B, H, T, D]
    k, v = (torch.randn(1, kv_heads, tokens, head_dim, generator=gen) for _ in range(2))  # [B, KV, T, D]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]  # [1, T]
    segment = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))  # [T]
    module = SimpleNamespace(num_key_value_groups=heads // kv_heads, is_causal=True, training=False)
    if arm == "dense_mask":
        def call():
            idx = torch.arange(tokens)
            mask = (segment[:, None] == segment[None, :]) & (idx[:, None] >= idx[None, :])  # [T, T]
            return sdpa_attention_forward(module, q, k, v, mask[None, None])[0]  # [B, T, H, D]
    elif arm == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        compiled = torch.compile(flex_attention, dynamic=False)

        def document_causal(b, h, q_idx, kv_idx):
            return (segment[q_idx] == segment[kv_idx]) & (q_idx >= kv_idx)

        def call():
            block_mask = create_block_mask(document_causal, None, None, tokens, tokens, device="cpu")
            return compiled(q, k, v, block_mask=block_mask, enable_gqa=True).transpose(1, 2)  # [B, T, H, D]
    else:
        def call():
            return packed_sdpa_attention(module, q, k, v, None, position_ids=positions)[0]  # [B, T, H, D]
    with torch.no_grad():
        call()  # warm-up (flex: the compile) outside the timing and the memory figure
        Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
        before = peak_rss_mib()
        seconds = timed(call, repeat)
        out = call()
    return {"arm": arm, "tokens": tokens, "conversations": len(lengths), "ms": seconds * 1e3,
            "peak_mib": peak_rss_mib() - before, "checksum": out.double().sum().item(),
            "sample": out[0, -1, :2, :4].tolist()}


def legacy(args) -> None:
    """Masked SDPA vs PACKED_SDPA, forward + backward, two 1024-token rows (the figures BENCHMARKS.md had)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from ds_vicuna.train.packed_attention import packed_sdpa_attention

    length = sum(ROWS[0])
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in ROWS])  # [B, T]
    segment = torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in ROWS])  # [B, T]
    mask = ((segment[:, :, None] == segment[:, None, :]) & torch.ones(length, length, dtype=torch.bool).tril())
    module = SimpleNamespace(num_key_value_groups=1, is_causal=True, training=True)
    print(f"{'dtype':<10}{'masked SDPA ms':>16}{'PACKED_SDPA ms':>16}{'speed-up':>10}")
    for dtype in (torch.float32, torch.bfloat16):
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(len(ROWS), 9, length, 64, generator=gen, dtype=dtype,
                               requires_grad=True) for _ in range(3))  # [B, H, T, D]

        def masked(q=q, k=k, v=v):
            sdpa_attention_forward(module, q, k, v, mask[:, None])[0].sum().backward()

        def packed(q=q, k=k, v=v):
            packed_sdpa_attention(module, q, k, v, None, position_ids=positions)[0].sum().backward()

        slow, fast = timed(masked, args.repeat), timed(packed, args.repeat)
        print(f"{str(dtype).removeprefix('torch.'):<10}{slow * 1e3:>16.0f}{fast * 1e3:>16.0f}{slow / fast:>9.2f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--legacy", action="store_true", help="the old fwd+bwd masked SDPA vs PACKED_SDPA table")
    parser.add_argument("--json", help="write the results here too")
    parser.add_argument("--arm", help=argparse.SUPPRESS)  # internal: one arm at --tokens[0] in this process
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.legacy:
        legacy(args)
        return 0
    if args.arm:
        print(json.dumps(run_arm(args.arm, args.tokens[0], args.heads, args.kv_heads, args.head_dim, args.repeat)))
        return 0
    results = []
    for tokens in args.tokens:
        row = {}
        for arm in ARMS:
            command = [sys.executable, __file__, "--arm", arm, "--tokens", str(tokens), "--heads", str(args.heads),
                       "--kv-heads", str(args.kv_heads), "--head-dim", str(args.head_dim), "--repeat",
                       str(args.repeat), "--threads", str(args.threads)]
            proc = subprocess.run(command, capture_output=True, text=True, timeout=1800)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            row[arm] = json.loads(proc.stdout.strip().splitlines()[-1])
        dense = row["dense_mask"]
        for arm in ARMS[1:]:  # the same attention: same outputs
            assert abs(row[arm]["checksum"] - dense["checksum"]) <= 1e-3 * max(1.0, abs(dense["checksum"])), row
        results.append(row)
        print(f"{tokens} tokens ({dense['conversations']} conversations): " + ", ".join(
            f"{arm} {row[arm]['ms']:.0f} ms / {row[arm]['peak_mib']:.0f} MiB" for arm in ARMS), flush=True)
    print(f"\nforward, one packed row, {args.heads} query heads / {args.kv_heads} KV heads x {args.head_dim}, fp32, "
          f"{args.threads} thread(s)")
    print(f"{'tokens':>7}{'dense ms':>10}{'flex ms':>9}{'packed ms':>11}{'dense MiB':>11}{'flex MiB':>10}"
          f"{'packed MiB':>12}{'dense/flex time':>17}")
    for row in results:
        d, f, p = row["dense_mask"], row["flex_attention"], row["packed_sdpa"]
        print(f"{d['tokens']:>7}{d['ms']:>10.0f}{f['ms']:>9.0f}{p['ms']:>11.0f}{d['peak_mib']:>11.0f}"
              f"{f['peak_mib']:>10.0f}{p['peak_mib']:>12.0f}{d['ms'] / f['ms']:>16.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
