"""Serving throughput: batched workers vs one-request-at-a-time, through the OpenAI-compatible API.

    python benchmarks/bench_serve.py                                   # starts our stack twice (embedded model)
    python benchmarks/bench_serve.py --max-tokens 32 --concurrency 1 4 8
    python benchmarks/bench_serve.py --base-url http://host:8000/v1 --model NAME [--api-key K] \
        [--baseline-url http://host:8001/v1]                            # any OpenAI-compatible server

32 fixed prompts are sent as streaming chat completions at each concurrency; for each level it prints completion
tokens/s (sum of `usage.completion_tokens` over wall time), p50/p95 request latency, p50 time to first token and
errors. The baseline is the same model served with `--max-batch-size 1` (one request generated at a time),
measured in the same run at the highest concurrency; the last line is the ratio of the two.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import requests

from ds_vicuna.launch_env import free_port

TOPICS = ["the moon", "bread", "rivers", "chess", "volcanoes", "bicycles", "honey bees", "the ocean", "libraries",
          "winter", "trains", "coffee", "mountains", "music", "gardens", "rain", "clocks", "deserts", "owls",
          "bridges", "paper", "glass", "salt", "maps", "lighthouses", "forests", "kites", "snow", "tea", "stars",
          "islands", "cheese"]
PROMPTS = [f"Write two sentences about {topic}." for topic in TOPICS]  # 32 fixed prompts


@dataclass
class Result:
    latency: float
    ttft: float
    tokens: int
    error: str | None = None


def one_request(base: str, model: str, prompt: str, max_tokens: int, headers: dict) -> Result:
    start = time.perf_counter()
    ttft, tokens = None, 0
    try:
        reply = requests.post(f"{base}/chat/completions", headers=headers, stream=True, timeout=900, json={
            "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}})
        if reply.status_code != 200:
            return Result(time.perf_counter() - start, 0.0, 0, f"HTTP {reply.status_code}")
        for line in reply.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                return Result(time.perf_counter() - start, 0.0, 0, event["error"].get("message"))
            if ttft is None and any(c.get("delta", {}).get("content") for c in event.get("choices", [])):
                ttft = time.perf_counter() - start
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    except requests.RequestException as err:
        return Result(time.perf_counter() - start, 0.0, 0, type(err).__name__)
    latency = time.perf_counter() - start
    return Result(latency, ttft if ttft is not None else latency, tokens)


def run_level(base: str, model: str, concurrency: int, max_tokens: int, headers: dict) -> dict:
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda p: one_request(base, model, p, max_tokens, headers), PROMPTS))
    wall = time.perf_counter() - start
    ok = [r for r in results if r.error is None]
    latencies = sorted(r.latency for r in ok) or [0.0]
    return {"concurrency": concurrency, "requests": len(results), "errors": len(results) - len(ok),
            "completion_tokens": sum(r.tokens for r in ok), "wall_s": round(wall, 2),
            "tokens_per_s": round(sum(r.tokens for r in ok) / wall, 2),
            "p50_latency_s": round(statistics.median(latencies), 2),
            "p95_latency_s": round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 2),
            "p50_ttft_s": round(statistics.median([r.ttft for r in ok] or [0.0]), 2)}



class OwnStack:
    """`ds-vicuna serve all` in a subprocess (python -m ds_vicuna.serve all), stopped on exit."""

    def __init__(self, model: str, max_batch_size: int):
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-u", "-m", "ds_vicuna.serve", "all", "--model", model,
                                      "--port", str(self.port), "--max-batch-size", str(max_batch_size)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self.ready.wait(600) or self.proc.poll() is not None:
            self.close()
            raise RuntimeError("the serving stack did not start")
        self.base = f"http://127.0.0.1:{self.port}/v1"
        self.model = requests.get(f"{self.base}/models", timeout=30).json()["data"][0]["id"]

    def _read(self):
        for line in self.proc.stdout:
            if "ds-vicuna API ready at" in line:
                self.ready.set()

    def close(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print(f"{'conc':>4} {'reqs':>4} {'err':>3} {'tokens':>6} {'wall s':>7} {'tok/s':>7} {'p50 lat':>7} "
          f"{'p95 lat':>7} {'p50 ttft':>8}")
    for r in rows:
        print(f"{r['concurrency']:>4} {r['requests']:>4} {r['errors']:>3} {r['completion_tokens']:>6} "
              f"{r['wall_s']:>7} {r['tokens_per_s']:>7} {r['p50_latency_s']:>7} {r['p95_latency_s']:>7} "
              f"{r['p50_ttft_s']:>8}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base-url", help="an OpenAI-compatible /v1 URL (default: start our own stack)")
    parser.add_argument("--baseline-url", help="the same model served one request at a time (default: start one "
                        "with --max-batch-size 1 when we start our own stack)")
    parser.add_argument("--model", default="embedded", help="model to start, or the served name with --base-url")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args(argv)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    top = max(args.concurrency)

    stack = None if args.base_url else OwnStack(args.model, args.max_batch_size)
    base, model = (args.base_url.rstrip("/"), args.model) if stack is None else (stack.base, stack.model)
    try:
        one_request(base, model, "Hello", 4, headers)  # warm-up
        batched = []
        for concurrency in args.concurrency:
            batched.append(run_level(base, model, concurrency, args.max_tokens, headers))
            print(f"  concurrency {concurrency}: {batched[-1]}", flush=True)
    finally:
        if stack is not None:
            stack.close()
    print_table(f"batched (max batch size {args.max_batch_size}) at {base}", batched)

    baseline, baseline_stack = None, None
    if args.baseline_url or stack is not None:
        baseline_stack = None if args.baseline_url else OwnStack(args.model, 1)
        base1 = args.baseline_url.rstrip("/") if args.baseline_url else baseline_stack.base
        try:
            one_request(base1, model, "Hello", 4, headers)
            baseline = run_level(base1, model, top, args.max_tokens, headers)
        finally:
            if baseline_stack is not None:
                baseline_stack.close()
        print_table("one request at a time (max batch size 1)", [baseline])
        ratio = batched[-1]["tokens_per_s"] / max(baseline["tokens_per_s"], 1e-9)
        print(f"\ntokens/s at concurrency {top}: batched {batched[-1]['tokens_per_s']} vs one-at-a-time "
              f"{baseline['tokens_per_s']} -> {ratio:.2f}x (target >= 3x)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"batched": batched, "one_at_a_time": baseline, "max_tokens": args.max_tokens}, f, indent=2)
    return 0 if all(r["errors"] == 0 for r in batched) else 1


if __name__ == "__main__":
    sys.exit(main())
