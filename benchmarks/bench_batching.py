"""Padding waste of three batching strategies, and tokenization throughput, on a skewed length mix.

    python benchmarks/bench_batching.py                      # synthetic ShareGPT-like mix, SmolLM2 tokenizer
    python benchmarks/bench_batching.py --data convs.jsonl   # your own conversations (ShareGPT/OpenAI)

Prints, for max_length 1024 and 2048, the share of padding tokens fed to the model by
- `max`:   pad every sample to max_length (FastChat's train.py),
- `group`: length-grouped dynamic padding (sorted inside mega-batches of 50 micro-batches),
- `pack`:  best-fit-decreasing packing into max_length rows (ds_vicuna.batching),
and conversations/s encoding with 1 process vs N worker processes (ds_vicuna.dataset.encode_conversations).
Conversations longer than max_length are first split at exchange boundaries, as `ds-vicuna data split` does.
"""
from __future__ import annotations

import argparse
import os
import pickle
import time

import numpy as np

from ds_vicuna.batching import make_micro_batches, padding_stats
from ds_vicuna.dataset import encode_conversations
from ds_vicuna.encoding import get_encoder
from ds_vicuna.formats import Conversation, load_conversations
from ds_vicuna.messages import Message, Role

WORDS = ("the model data train token python function value return list error answer question because "
         "which would could should example result output input system user assistant chat code loop "
         "import class def print file path test case more than less about when where what how why").split()


def synthetic_conversations(n: int, seed: int) -> list[Conversation]:
    """ShareGPT-like mix: 1 + geometric exchanges, lognormal turn lengths (short questions, longer answers)."""
    rng = np.random.default_rng(seed)

    def text(mean_log: float, sigma: float) -> str:
        count = max(1, int(rng.lognormal(mean_log, sigma)))
        words = rng.choice(WORDS, size=count)
        return " ".join(words) + rng.choice([".", "?", "!\n", ".\n\n"])

    convs = []
    for i in range(n):
        messages = []
        for _ in range(1 + rng.geometric(0.45)):
            messages += [Message(Role.USER, text(3.0, 1.0)), Message(Role.ASSISTANT, text(4.6, 0.9))]
        convs.append(Conversation(f"syn-{i}", messages))
    return convs


def split_to_fit(encoder, conv: Conversation, max_length: int) -> list[list[Message]]:
    """Greedy split at exchange boundaries so every piece fits; an exchange too long alone is truncated."""
    exchanges = [conv.messages[i:i + 2] for i in range(0, len(conv.messages), 2)]
    pieces, current = [], []
    for exchange in exchanges:
        if len(encoder.encode(current + exchange)["input_ids"]) <= max_length:
            current = current + exchange
            continue
        if current:
            pieces.append(current)
        current = exchange
        while len(encoder.encode(current)["input_ids"]) > max_length:
            current = _shorten_longer_turn(current)
    pieces.append(current)
    return pieces


def _shorten_longer_turn(exchange: list[Message]) -> list[Message]:
    """Drop the last 20% of the words of the longer turn (the split stage truncates and counts these)."""
    longest = max(range(len(exchange)), key=lambda i: len(exchange[i].content))
    words = exchange[longest].content.split(" ")
    if len(words) == 1:
        raise ValueError("cannot shorten a one-word turn")
    cut = Message(exchange[longest].role, " ".join(words[:int(len(words) * 0.8)]))
    return [cut if i == longest else m for i, m in enumerate(exchange)]


def fitted_lengths(encoder, convs, encoded, max_length: int) -> np.ndarray:
    lengths = []
    for conv, (ids, _) in zip(convs, encoded):
        if len(ids) <= max_length:
            lengths.append(len(ids))
        else:
            lengths += [len(encoder.encode(p)["input_ids"]) for p in split_to_fit(encoder, conv, max_length)]
    return np.array(lengths)


def padding_table(lengths: np.ndarray, max_length: int, micro_batch_size: int) -> dict[str, float]:
    shares = {}
    for strategy in ("max", "group", "pack"):
        plan = make_micro_batches(lengths, strategy, max_length, micro_batch_size, seed=0, epoch=0)
        real, fed = padding_stats(lengths, plan, strategy, max_length)
        shares[strategy] = (1 - real / fed, fed)
    return shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", help="conversations file (default: synthetic)")
    parser.add_argument("--num", type=int, default=2000, help="synthetic conversations")
    parser.add_argument("--template", default="chatml")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from ds_vicuna.models import embedded_model_path

    path = embedded_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    convs = load_conversations(args.data) if args.data else synthetic_conversations(args.num, seed=0)
    print(f"{len(convs)} conversations ({'file ' + args.data if args.data else 'synthetic, lognormal turns'}), "
          f"SmolLM2 tokenizer, template {args.template}")

    start = time.perf_counter()
    tokenizer_loaded = AutoTokenizer.from_pretrained(path)
    by_path = time.perf_counter() - start
    start = time.perf_counter()
    pickle.loads(pickle.dumps(tokenizer_loaded))
    by_pickle = time.perf_counter() - start
    print(f"\ntokenizer to a worker: from_pretrained(path) {by_path * 1e3:.0f} ms, pickle round trip "
          f"{by_pickle * 1e3:.0f} ms (pickle is used: it keeps tokens added in memory)")

    get_encoder(tokenizer, args.template)  # built once, outside the timings
    timings, load = {}, os.getloadavg()[0]
    for workers in (1, args.workers):
        start = time.perf_counter()
        encoded = encode_conversations(convs, tokenizer, args.template, num_workers=workers, progress=False)
        timings[workers] = len(convs) / (time.perf_counter() - start)
    print(f"\ntokenization throughput ({os.cpu_count()} cores, load average {load:.1f} before): "
          f"1 process {timings[1]:.0f} conv/s, {args.workers} workers "
          f"{timings[args.workers]:.0f} conv/s ({timings[args.workers] / timings[1]:.2f}x)")

    encoder = get_encoder(tokenizer, args.template)
    raw = np.array([len(ids) for ids, _ in encoded])
    print(f"\nlengths: median {int(np.median(raw))}, p90 {int(np.percentile(raw, 90))}, "
          f"p99 {int(np.percentile(raw, 99))}, max {raw.max()} tokens")
    print(f"\n{'max_length':>10} {'samples':>8} | padding share: {'max (FastChat)':>14} {'group':>8} {'pack':>8} | "
          f"tokens fed vs pack: {'max':>6} {'group':>6}")
    for max_length in (1024, 2048):
        lengths = fitted_lengths(encoder, convs, encoded, max_length)
        shares = padding_table(lengths, max_length, args.micro_batch_size)
        pack_fed = shares["pack"][1]
        print(f"{max_length:>10} {len(lengths):>8} | {'':>15}{shares['max'][0]:>14.1%} {shares['group'][0]:>8.1%} "
              f"{shares['pack'][0]:>8.2%} | {'':>20}{shares['max'][1] / pack_fed:>5.2f}x "
              f"{shares['group'][1] / pack_fed:>5.2f}x")
    print(f"\n(micro-batch size {args.micro_batch_size}; target: pack wastes < 5%)")


if __name__ == "__main__":
    main()
