"""Serving under load: tokens/s, TTFT and errors at concurrency 1-128, beside in-process generation in the same run.

    python benchmarks/bench_serve.py --skip-prefill-gap                # CPU: embedded model, concurrency 1 8 32 128
    python benchmarks/bench_serve.py --device cuda --random-model 1b --concurrency 1 8 32 --max-batch-size 32
    python benchmarks/bench_serve.py --base-url http://host:8000/v1 --model NAME [--api-key K] \
        [--baseline-url http://host:8001/v1]                            # any OpenAI-compatible server

Throughput: at each concurrency, max(--requests, concurrency) streaming chat completions (32 fixed prompts,
cycled) are sent by that many clients at once; a 429 is retried after its Retry-After, as the `openai` client does,
and counted apart. Each level prints completion tokens/s (sum of `usage.completion_tokens` over wall time),
p50/p95 request latency, p50/p99 time to first token (TTFT), 429s and errors (anything else that failed). The
baselines, measured in the same run after the stack is stopped: plain transformers `model.generate` on the same
device, one prompt at a time and in left-padded batches of --max-batch-size (what the worker batches), and
optionally (`--baseline stack`) our server at `--max-batch-size 1`. The last lines are the ratios.

Chunked prefill (own stack only; --skip-prefill-gap to leave it out): one stream counts upwards
(`/v1/completions`, greedy) while a 4,000-token prompt is sent; the figure is the longest gap between two tokens
of the running stream from the moment the long prompt is sent until its answer arrives, side by side for the
worker's default prefill chunk and for `--prefill-chunk 0` (the whole prompt in one piece).

--random-model 1b builds a ~1.1B Llama-shaped model (TinyLlama's shape over the bundled tokenizer,
$DS_VICUNA_TOKENIZER or the embedded model's; random weights: speed does not depend on them) in --workdir, the
default with --device cuda; `tiny` builds a 2-layer one to try the script on a CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import requests

from ds_vicuna.model.random_weights import SHAPES
from ds_vicuna.train.launch_env import free_port

TOPICS = ["the moon", "bread", "rivers", "chess", "volcanoes", "bicycles", "honey bees", "the ocean", "libraries",
          "winter", "trains", "coffee", "mountains", "music", "gardens", "rain", "clocks", "deserts", "owls",
          "bridges", "paper", "glass", "salt", "maps", "lighthouses", "forests", "kites", "snow", "tea", "stars",
          "islands", "cheese"]
PROMPTS = [f"Write two sentences about {topic}." for topic in TOPICS]  # 32 fixed prompts
COUNTING = ", ".join(str(i) for i in range(1, 21)) + ","  # a stream the model keeps going: "1, 2, ... 20,"
LONG_PROMPT_TOKENS = 4000


@dataclass
class Result:
    latency: float
    ttft: float
    tokens: int
    error: str | None = None
    rejected: int = 0  # 429s before it was taken


MAX_429_RETRIES = 600


def one_request(base: str, model: str, prompt: str, max_tokens: int, headers: dict) -> Result:
    start = time.perf_counter()
    ttft, tokens, rejected = None, 0, 0
    try:
        while True:
            reply = requests.post(f"{base}/chat/completions", headers=headers, stream=True, timeout=900, json={
                "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                "temperature": 0, "stream": True, "stream_options": {"include_usage": True}})
            if reply.status_code != 429 or rejected >= MAX_429_RETRIES:
                break
            rejected += 1
            reply.close()
            time.sleep(float(reply.headers.get("Retry-After", 1)))
        if reply.status_code != 200:
            return Result(time.perf_counter() - start, 0.0, 0, f"HTTP {reply.status_code}", rejected)
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
    return Result(latency, ttft if ttft is not None else latency, tokens, rejected=rejected)


def _quantile(values: list[float], q: float) -> float:
    values = sorted(values) or [0.0]
    return values[min(len(values) - 1, int(q * len(values)))]


def summarize(concurrency: int, results: list[Result], wall: float) -> dict:
    ok = [r for r in results if r.error is None]
    latencies = [r.latency for r in ok]
    return {"concurrency": concurrency, "requests": len(results), "errors": len(results) - len(ok),
            "rejected_429": sum(r.rejected for r in results),
            "completion_tokens": sum(r.tokens for r in ok), "wall_s": round(wall, 2),
            "tokens_per_s": round(sum(r.tokens for r in ok) / wall, 2),
            "p50_latency_s": round(statistics.median(latencies or [0.0]), 2),
            "p95_latency_s": round(_quantile(latencies, 0.95), 2),
            "p50_ttft_s": round(statistics.median([r.ttft for r in ok] or [0.0]), 2),
            "p99_ttft_s": round(_quantile([r.ttft for r in ok], 0.99), 2)}


def run_level(base: str, model: str, concurrency: int, max_tokens: int, headers: dict, requests_: int = 32) -> dict:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(max(requests_, concurrency))]
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda p: one_request(base, model, p, max_tokens, headers), prompts))
    return summarize(concurrency, results, time.perf_counter() - start)


# ---- chunked prefill --------------------------------------------------------------------------------------
def long_prompt(model_dir: Path, tokens: int = LONG_PROMPT_TOKENS) -> str:
    """About `tokens` tokens of plain text (cut at a token boundary of the served model's tokenizer)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = " ".join(f"Note {i}: the {TOPICS[i % len(TOPICS)]} report is filed under shelf {i * 7 % 97}."
                    for i in range(tokens // 8))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:tokens]
    return tokenizer.decode(ids)


def prefill_gap(base: str, model: str, prompt: str, headers: dict) -> dict:
    """Longest gap between two tokens of a running stream while `prompt` is prefilled; the long prompt's TTFT."""
    arrivals: list[float] = []
    started, stop = threading.Event(), threading.Event()

    def running_stream():
        reply = requests.post(f"{base}/completions", headers=headers, stream=True, timeout=900, json={
            "model": model, "prompt": COUNTING, "max_tokens": 600, "temperature": 0, "stream": True})
        for line in reply.iter_lines():
            if line.startswith(b"data: {") and json.loads(line[6:]).get("choices", [{}])[0].get("text"):
                arrivals.append(time.perf_counter())
                if len(arrivals) >= 8:
                    started.set()
            if stop.is_set():
                break
        reply.close()
        started.set()

    thread = threading.Thread(target=running_stream, daemon=True)
    thread.start()
    started.wait(600)
    sent = time.perf_counter()
    reply = requests.post(f"{base}/completions", headers=headers, timeout=900,
                          json={"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0})
    answered = time.perf_counter()
    seen = len(arrivals)
    deadline = time.monotonic() + 60
    while len(arrivals) == seen and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)  # the next token after the long prompt's answer closes the last gap
    stop.set()
    inside = [t for t in arrivals if sent <= t <= answered]
    outlived = any(t > answered for t in arrivals)
    points = [sent] + inside + ([min(t for t in arrivals if t > answered)] if outlived else [])
    gaps = [b - a for a, b in zip(points, points[1:])]
    thread.join(60)
    return {"long_prompt_status": reply.status_code, "long_prompt_ttft_s": round(answered - sent, 2),
            "max_gap_s": round(max(gaps), 2) if gaps else None, "stream_tokens_meanwhile": len(inside),
            "stream_outlived_prefill": outlived,
            "long_prompt_tokens": reply.json().get("usage", {}).get("prompt_tokens") if reply.ok else None}


# ---- stacks and baselines -----------------------------------------------------------------------------------
class OwnStack:
    """`ds-vicuna serve all` in a subprocess (python -m ds_vicuna.serve all), stopped on exit."""

    def __init__(self, model: str, max_batch_size: int, extra: list[str] = ()):
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-u", "-m", "ds_vicuna.serve", "all", "--model", model,
                                      "--port", str(self.port), "--max-batch-size", str(max_batch_size), *extra],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.ready, self.lines = threading.Event(), []
        threading.Thread(target=self._read, daemon=True).start()
        if not self.ready.wait(900) or self.proc.poll() is not None:
            self.close()
            raise RuntimeError("the serving stack did not start:\n" + "".join(self.lines[-30:]))
        self.base = f"http://127.0.0.1:{self.port}/v1"
        self.model = requests.get(f"{self.base}/models", timeout=30).json()["data"][0]["id"]
        self.loaded = next((line.strip() for line in self.lines if line.startswith("loaded ")), "")

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            if "ds-vicuna API ready at" in line:
                self.ready.set()

    def close(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def generate_baseline(model_dir: str, device: str, max_tokens: int) -> dict:
    """Plain transformers: the same chat prompts through `model.generate`, one at a time, greedy."""
    import torch

    from ds_vicuna.model.loading import load_chat_model

    chat = load_chat_model(model_dir, device=device)
    prompts = [chat.encoder.encode_prompt([{"role": "user", "content": p}]) for p in PROMPTS]

    def generate(ids, new_tokens):
        prompt = torch.tensor([ids], device=chat.device)  # [1, T]
        with torch.no_grad():
            out = chat.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                      do_sample=False, eos_token_id=chat.stop_token_ids,
                                      pad_token_id=chat.stop_token_ids[0])
        if chat.device.type == "cuda":
            torch.cuda.synchronize()
        return out.shape[1] - prompt.shape[1]

    generate(prompts[0], 4)  # warm-up
    results = []
    for ids in prompts:
        t0 = time.perf_counter()
        generate(ids, 1)
        ttft = time.perf_counter() - t0
        t1 = time.perf_counter()
        tokens = generate(ids, max_tokens)
        results.append(Result(time.perf_counter() - t1, ttft, tokens))
    wall = sum(r.latency for r in results)  # the TTFT probes are not part of the baseline's work
    return summarize(1, results, wall)


def padded_batch_baseline(model_dir: str, device: str, max_tokens: int, batch_size: int) -> dict:
    """Plain transformers: the same chat prompts through `model.generate` in left-padded batches of `batch_size`,
    greedy (what a static batcher does; the worker batches the same rows continuously). Tokens are counted up to
    each row's first stop token; TTFT of a row is its batch's 1-token generate."""
    import torch

    from ds_vicuna.model.loading import load_chat_model

    chat = load_chat_model(model_dir, device=device)
    prompts = [chat.encoder.encode_prompt([{"role": "user", "content": p}]) for p in PROMPTS]
    pad, stops = chat.stop_token_ids[0], set(chat.stop_token_ids)

    def generate(batch: list[list[int]], new_tokens: int) -> list[int]:
        width = max(len(ids) for ids in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=chat.device)  # [b, T] left-padded
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=chat.device)
        with torch.no_grad():
            out = chat.model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                                      eos_token_id=chat.stop_token_ids, pad_token_id=pad)
        counts = []
        for row in out[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in stops), len(row))
            counts.append(cut)
        return counts

    generate(prompts[:batch_size], 4)  # warm-up
    results, wall = [], 0.0
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        t0 = time.perf_counter()
        generate(batch, 1)
        ttft = time.perf_counter() - t0
        t1 = time.perf_counter()
        counts = generate(batch, max_tokens)
        took = time.perf_counter() - t1
        wall += took
        results += [Result(took, ttft, n) for n in counts]
    return summarize(batch_size, results, wall)


def random_model(size: str, workdir: Path) -> Path:
    """A random Llama-shaped model over the bundled tokenizer ($DS_VICUNA_TOKENIZER, else the embedded model's),
    saved once in `workdir` (bf16 safetensors): the GPU machine needs no embedded model's weights."""
    from ds_vicuna.model.random_weights import bundled_tokenizer_dir, write_random_llama

    folder = workdir / f"random-llama-{size}"
    write_random_llama(folder, bundled_tokenizer_dir(), size, dtype="bf16")
    print(f"random {size} model in {folder}", flush=True)
    return folder


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    print(f"{'conc':>4} {'reqs':>4} {'err':>3} {'429':>4} {'tokens':>6} {'wall s':>7} {'tok/s':>7} {'p50 lat':>7} "
          f"{'p95 lat':>7} {'p50 ttft':>8} {'p99 ttft':>8}")
    for r in rows:
        print(f"{r['concurrency']:>4} {r['requests']:>4} {r['errors']:>3} {r['rejected_429']:>4} "
              f"{r['completion_tokens']:>6} {r['wall_s']:>7} {r['tokens_per_s']:>7} {r['p50_latency_s']:>7} "
              f"{r['p95_latency_s']:>7} {r['p50_ttft_s']:>8} {r['p99_ttft_s']:>8}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base-url", help="an OpenAI-compatible /v1 URL (default: start our own stack)")
    parser.add_argument("--baseline-url", help="the same model served one request at a time")
    parser.add_argument("--model", default=None, help="model to start, or the served name with --base-url "
                        "(default: embedded; with --device cuda, --random-model 1b: no weights travel to a GPU)")
    parser.add_argument("--random-model", choices=sorted(SHAPES), help="serve a random Llama of this shape")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "ds-vicuna-bench"),
                        help="where --random-model is built")
    parser.add_argument("--device", default=None, help="worker --device (default: the worker's auto)")
    parser.add_argument("--baseline", choices=["stack", "generate"], default="generate",
                        help="generate (default): plain model.generate in this process, one at a time and in padded "
                        "batches; stack: also our server at --max-batch-size 1")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--requests", type=int, default=32, help="requests per level (at least its concurrency)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--skip-prefill-gap", action="store_true", help="leave out the chunked-prefill figure")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args(argv)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    top = max(args.concurrency)
    if args.model is None and args.random_model is None and (args.device or "").startswith("cuda"):
        args.random_model = "1b"
    model = str(random_model(args.random_model, Path(args.workdir))) if args.random_model else \
        args.model or "embedded"
    baseline_kind = args.baseline
    device = ["--device", args.device] if args.device else []
    figures: dict = {"max_tokens": args.max_tokens, "model": model}

    stack = None if args.base_url else OwnStack(model, args.max_batch_size, device)
    base, name = (args.base_url.rstrip("/"), model) if stack is None else (stack.base, stack.model)
    try:
        if stack is not None:
            print(stack.loaded, flush=True)
            figures["loaded"] = stack.loaded
        one_request(base, name, "Hello", 4, headers)  # warm-up
        batched = []
        for concurrency in args.concurrency:
            batched.append(run_level(base, name, concurrency, args.max_tokens, headers, args.requests))
            print(f"  concurrency {concurrency}: {batched[-1]}", flush=True)
        if stack is not None and not args.skip_prefill_gap:
            from ds_vicuna.model.embedded import resolve_model_path

            prompt = long_prompt(resolve_model_path(model))
            figures["prefill_gap_chunked"] = prefill_gap(base, name, prompt, headers)
            print(f"  chunked prefill (default chunk): {figures['prefill_gap_chunked']}", flush=True)
    finally:
        if stack is not None:
            stack.close()
    figures["batched"] = batched
    print_table(f"batched (max batch size {args.max_batch_size}) at {base}", batched)

    if stack is not None and not args.skip_prefill_gap:
        whole = OwnStack(model, args.max_batch_size, device + ["--prefill-chunk", "0"])
        try:
            figures["prefill_gap_whole"] = prefill_gap(whole.base, whole.model, prompt, headers)
            print(f"  whole-prompt prefill (--prefill-chunk 0): {figures['prefill_gap_whole']}", flush=True)
        finally:
            whole.close()
        chunked, one_piece = figures["prefill_gap_chunked"], figures["prefill_gap_whole"]
        print(f"\nlongest gap in a running stream while a {chunked['long_prompt_tokens']}-token prompt joins: chunked "
              f"{chunked['max_gap_s']} s vs whole {one_piece['max_gap_s']} s (goal < 2 s on the 2-core CPU); the long "
              f"prompt's own TTFT: {chunked['long_prompt_ttft_s']} s vs {one_piece['long_prompt_ttft_s']} s")

    if args.baseline_url or (stack is not None and baseline_kind == "stack"):
        baseline_stack = None if args.baseline_url else OwnStack(model, 1, device)
        base1 = args.baseline_url.rstrip("/") if args.baseline_url else baseline_stack.base
        try:
            one_request(base1, name, "Hello", 4, headers)
            figures["baseline_server"] = run_level(base1, name, top, args.max_tokens, headers, args.requests)
        finally:
            if baseline_stack is not None:
                baseline_stack.close()
        print_table("baseline server", [figures["baseline_server"]])
    if stack is not None:  # in-process generation on the same device, after the stack has stopped
        figures["generate_one"] = generate_baseline(model, args.device or "auto", args.max_tokens)
        figures["generate_padded"] = padded_batch_baseline(model, args.device or "auto", args.max_tokens,
                                                           args.max_batch_size)
        print_table("plain transformers model.generate: one prompt at a time (conc 1), then left-padded batches "
                    f"of {args.max_batch_size} (TTFT: a 1-token generate)",
                    [figures["generate_one"], figures["generate_padded"]])
        padded = max(figures["generate_padded"]["tokens_per_s"], 1e-9)
        at = {r["concurrency"]: r for r in batched}
        for concurrency, row in at.items():
            print(f"concurrency {concurrency}: {row['tokens_per_s']} tokens/s over HTTP = "
                  f"{row['tokens_per_s'] / padded:.0%} of in-process padded batches, "
                  f"{row['tokens_per_s'] / max(figures['generate_one']['tokens_per_s'], 1e-9):.2f}x one at a time; "
                  f"{row['rejected_429']} 429s (retried), {row['errors']} errors")
        if 8 in at and 128 in at:
            print(f"goals: at 8 >= 95% of padded batches: {at[8]['tokens_per_s'] / padded:.0%}; at 128 zero errors "
                  f"but 429: {at[128]['errors'] == 0}, tokens/s no lower than at 8: "
                  f"{at[128]['tokens_per_s']} vs {at[8]['tokens_per_s']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(figures, f, indent=2)
    return 0 if all(r["errors"] == 0 for r in batched) else 1


if __name__ == "__main__":
    sys.exit(main())
