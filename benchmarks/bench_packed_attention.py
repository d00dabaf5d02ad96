"""Attention over packed rows on CPU: transformers' masked SDPA vs PACKED_SDPA (one causal SDPA per conversation).

    python benchmarks/bench_packed_attention.py                 # SmolLM2-135M's heads, 2 rows of 1024, fp32 + bf16

One attention call (forward + backward) on two 1024-token rows packed with a ShareGPT-like mix of lengths, 9 heads
of 64 (SmolLM2-135M), one thread: what every layer of a training step pays (twice the forward with gradient
checkpointing). The masked kernel computes all 1024^2 scores of a row; PACKED_SDPA only each conversation's.
"""
from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import torch

ROWS = [[700, 150, 100, 50, 24], [300, 250, 200, 120, 100, 54]]  # conversation lengths in each 1024-token row


def timed(fn, repeat: int) -> float:
    fn()  # warm-up
    started = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - started) / repeat


def main() -> None:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from ds_vicuna.train.packed_attention import packed_sdpa_attention

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    length = sum(ROWS[0])
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in ROWS])  # [B, T]
    segment = torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in ROWS])  # [B, T]
    mask = ((segment[:, :, None] == segment[:, None, :]) & torch.ones(length, length, dtype=torch.bool).tril())
    module = SimpleNamespace(num_key_value_groups=1, is_causal=True, training=True)
    print(f"{'dtype':<10}{'masked SDPA ms':>16}{'PACKED_SDPA ms':>16}{'speed-up':>10}")
    for dtype in (torch.float32, torch.bfloat16):
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(len(ROWS), args.heads, length, args.head_dim, generator=gen, dtype=dtype,
                               requires_grad=True) for _ in range(3))  # [B, H, T, D]

        def masked(q=q, k=k, v=v):
            sdpa_attention_forward(module, q, k, v, mask[:, None])[0].sum().backward()

        def packed(q=q, k=k, v=v):
            packed_sdpa_attention(module, q, k, v, None, position_ids=positions)[0].sum().backward()

        slow, fast = timed(masked, args.repeat), timed(packed, args.repeat)
        print(f"{str(dtype).removeprefix('torch.'):<10}{slow * 1e3:>16.0f}{fast * 1e3:>16.0f}{slow / fast:>9.2f}x")


if __name__ == "__main__":
    main()
