"""Serving: batched workers vs one-at-a-time, and how long running streams stall while a long prompt joins.

    python benchmarks/bench_serve.py                                   # CPU: embedded model, concurrency 1 4 8
    python benchmarks/bench_serve.py --device cuda --random-model 1b --concurrency 1 8 32 --max-batch-size 32
    python benchmarks/bench_serve.py --base-url http://host:8000/v1 --model NAME [--api-key K] \
        [--baseline-url http://host:8001/v1]                            # any OpenAI-compatible server

Throughput: 32 fixed prompts are sent as streaming chat completions at each concurrency; each level prints
completion tokens/s (sum of `usage.completion_tokens` over wall time), p50/p95 request latency, p50 time to first
token (TTFT) and errors. The baseline, measured in the same run at the highest concurrency, is the same model
served with `--max-batch-size 1` (default), or with `--baseline generate` plain transformers `model.generate` on
the same device, one prompt at a time (the default with --random-model). The last line is the ratio.

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


def summarize(concurrency: int, results: list[Result], wall: float) -> dict:
    ok = [r for r in results if r.error is None]
    latencies = sorted(r.latency for r in ok) or [0.0]
    return {"concurrency": concurrency, "requests": len(results), "errors": len(results) - len(ok),
            "completion_tokens": sum(r.tokens for r in ok), "wall_s": round(wall, 2),
            "tokens_per_s": round(sum(r.tokens for r in ok) / wall, 2),
            "p50_latency_s": round(statistics.median(latencies), 2),
            "p95_latency_s": round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 2),
            "p50_ttft_s": round(statistics.median([r.ttft for r in ok] or [0.0]), 2)}


def run_level(base: str, model: str, concurrency: int, max_tokens: int, headers: dict) -> dict:
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda p: one_request(base, model, p, max_tokens, headers), PROMPTS))
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
    print(f"{'conc':>4} {'reqs':>4} {'err':>3} {'tokens':>6} {'wall s':>7} {'tok/s':>7} {'p50 lat':>7} "
          f"{'p95 lat':>7} {'p50 ttft':>8}")
    for r in rows:
        print(f"{r['concurrency']:>4} {r['requests']:>4} {r['errors']:>3} {r['completion_tokens']:>6} "
              f"{r['wall_s']:>7} {r['tokens_per_s']:>7} {r['p50_latency_s']:>7} {r['p95_latency_s']:>7} "
              f"{r['p50_ttft_s']:>8}")


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
    parser.add_argument("--baseline", choices=["stack", "generate"],
                        help="stack: our server at --max-batch-size 1; generate: plain model.generate one at a time "
                        "(default: generate with --random-model, else stack)")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
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
    baseline_kind = args.baseline or ("generate" if args.random_model else "stack")
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
            batched.append(run_level(base, name, concurrency, args.max_tokens, headers))
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

    baseline = None
    if args.baseline_url or (stack is not None and baseline_kind == "stack"):
        baseline_stack = None if args.baseline_url else OwnStack(model, 1, device)
        base1 = args.baseline_url.rstrip("/") if args.baseline_url else baseline_stack.base
        try:
            one_request(base1, name, "Hello", 4, headers)
            baseline = run_level(base1, name, top, args.max_tokens, headers)
        finally:
            if baseline_stack is not None:
                baseline_stack.close()
        print_table("one request at a time (max batch size 1)", [baseline])
    elif stack is not None:
        baseline = generate_baseline(model, args.device or "auto", args.max_tokens)
        print_table("plain transformers model.generate, one prompt at a time (TTFT: a 1-token generate)", [baseline])
    if baseline is not None:
        figures["baseline"] = {"kind": "url" if args.baseline_url else baseline_kind, **baseline}
        ratio = batched[-1]["tokens_per_s"] / max(baseline["tokens_per_s"], 1e-9)
        print(f"\ntokens/s at concurrency {top}: batched {batched[-1]['tokens_per_s']} vs one-at-a-time "
              f"{baseline['tokens_per_s']} -> {ratio:.2f}x (target >= 3x)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(figures, f, indent=2)
    return 0 if all(r["errors"] == 0 for r in batched) else 1


if __name__ == "__main__":
    sys.exit(main())
