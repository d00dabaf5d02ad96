"""Padding waste of three batching strategies, and tokenization throughput, on a skewed length mix.

    python benchmarks/bench_batching.py                      # the bundled sample, SmolLM2 tokenizer
    python benchmarks/bench_batching.py --synthetic 2000     # synthetic ShareGPT-like mix (lognormal turns)
    python benchmarks/bench_batching.py --data convs.json    # your own conversations (ShareGPT/OpenAI)

Prints, for max_length 1024 and 2048, the share of padding tokens fed to the model by
- `max`:   pad every sample to max_length (FastChat's train.py),
- `group`: length-grouped dynamic padding (sorted inside mega-batches of 50 micro-batches),
- `pack`:  best-fit-decreasing packing into max_length rows (ds_vicuna.train.batching),
and conversations/s encoding with 1 process vs N worker processes (ds_vicuna.train.dataset.encode_conversations).
The data goes through the real stages first: `ds-vicuna data clean`, then `data split` at each max_length, then
`build_tokenized_dataset`; the throughput figure repeats the split data up to --throughput-convs conversations.
"""
from __future__ import annotations

import argparse
import os
import pickle
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from ds_vicuna.train.batching import make_micro_batches, padding_stats
from ds_vicuna.data.clean import clean_file
from ds_vicuna.train.dataset import build_tokenized_dataset, encode_conversations
from ds_vicuna.chat.encoding import get_encoder
from ds_vicuna.data.formats import Conversation, load_conversations, write_conversations
from ds_vicuna.chat.messages import Message, Role
from ds_vicuna.data.split import split_file
from ds_vicuna.model.tokenizer import load_tokenizer

BUNDLED = Path(__file__).resolve().parents[1] / "ds_vicuna" / "data" / "sharegpt_sample.json"

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


def padding_table(lengths: np.ndarray, max_length: int, micro_batch_size: int) -> dict[str, float]:
    shares = {}
    for strategy in ("max", "group", "pack"):
        plan = make_micro_batches(lengths, strategy, max_length, micro_batch_size, seed=0, epoch=0)
        real, fed = padding_stats(lengths, plan, strategy, max_length)
        shares[strategy] = (1 - real / fed, fed)
    return shares


def prepare(args, workdir: Path, tokenizer) -> Path:
    """The cleaned conversations file the benchmark runs on (bundled sample or synthetic)."""
    if args.synthetic:
        source = workdir / "synthetic.jsonl"
        write_conversations(source, synthetic_conversations(args.synthetic, seed=0))
    else:
        source = Path(args.data)
    cleaned = workdir / "clean.jsonl"
    clean_file(source, cleaned, skip_bad=True, progress=False)
    return cleaned


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (pool workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def throughput(convs: list[Conversation], tokenizer, template: str, workers: int) -> dict[int, tuple[float, float]]:
    """(conversations per wall second, CPU milliseconds per conversation) with 1 and with `workers` processes.

    CPU cost per conversation does not depend on what else runs on the machine; with free cores the wall
    speedup is about workers x (CPU cost with 1 process / CPU cost with workers).
    """
    get_encoder(tokenizer, template)  # built once, outside the timings
    rates = {}
    for n in (1, workers):
        wall, cpu = time.perf_counter(), _cpu_seconds()
        encode_conversations(convs, tokenizer, template, num_workers=n, progress=False)
        wall, cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
        rates[n] = (len(convs) / wall, cpu / len(convs) * 1e3)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(BUNDLED), help="conversations file (default: the bundled sample)")
    parser.add_argument("--synthetic", type=int, default=0, help="use N synthetic conversations instead")
    parser.add_argument("--template", default="vicuna_v1.1")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--throughput-convs", type=int, default=2000,
                        help="conversations encoded for the throughput figure (the data repeated as needed)")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from ds_vicuna.model.embedded import embedded_model_path

    tokenizer = load_tokenizer("embedded", args.template)
    workdir = Path(tempfile.mkdtemp(prefix="bench-batching-"))
    try:
        cleaned = prepare(args, workdir, tokenizer)
        what = f"{args.synthetic} synthetic conversations" if args.synthetic else args.data
        print(f"data: {what} -> ds-vicuna data clean -> split per max_length; SmolLM2 tokenizer, template "
              f"{args.template}, micro-batch size {args.micro_batch_size}")
        print(f"\n{'max_length':>10} {'samples':>8} {'median':>7} {'p99':>6} | padding share: {'max (FastChat)':>14} "
              f"{'group':>7} {'pack':>7} | tokens fed vs pack: {'max':>6} {'group':>6}")
        for max_length in (1024, 2048):
            pieces = workdir / f"split-{max_length}.jsonl"
            split_file(cleaned, pieces, tokenizer, args.template, max_length, progress=False)
            lengths = build_tokenized_dataset(pieces, tokenizer, args.template, max_length,
                                              cache_dir=workdir / "cache", num_workers=1,
                                              progress=False).lengths
            shares = padding_table(lengths, max_length, args.micro_batch_size)
            pack_fed = shares["pack"][1]
            print(f"{max_length:>10} {len(lengths):>8} {int(np.median(lengths)):>7} "
                  f"{int(np.percentile(lengths, 99)):>6} | {'':>15}{shares['max'][0]:>14.1%} "
                  f"{shares['group'][0]:>7.1%} {shares['pack'][0]:>7.2%} | {'':>20}"
                  f"{shares['max'][1] / pack_fed:>5.2f}x {shares['group'][1] / pack_fed:>5.2f}x")
        print("(target: pack wastes < 5%)")

        convs = load_conversations(workdir / "split-2048.jsonl")
        convs = (convs * (args.throughput_convs // len(convs) + 1))[:args.throughput_convs]
        load = os.getloadavg()[0]
        rates = throughput(convs, tokenizer, args.template, args.workers)
        (one, one_cpu), (many, many_cpu) = rates[1], rates[args.workers]
        print(f"\ntokenization throughput, {len(convs)} conversations ({os.cpu_count()} cores, load average "
              f"{load:.1f} before): 1 process {one:.0f} conv/s, {args.workers} workers {many:.0f} conv/s "
              f"({many / one:.2f}x wall); CPU per conversation {one_cpu:.2f} ms vs {many_cpu:.2f} ms "
              f"(expected speedup with {args.workers} free cores: {args.workers * one_cpu / many_cpu:.2f}x)")

        start = time.perf_counter()
        AutoTokenizer.from_pretrained(embedded_model_path())
        by_path = time.perf_counter() - start
        start = time.perf_counter()
        pickle.loads(pickle.dumps(tokenizer))
        by_pickle = time.perf_counter() - start
        print(f"tokenizer to a worker: from_pretrained(path) {by_path * 1e3:.0f} ms, pickle round trip "
              f"{by_pickle * 1e3:.0f} ms (pickle is used: it also keeps tokens added in memory)")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
