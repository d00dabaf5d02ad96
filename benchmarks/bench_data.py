"""Data pipeline at ShareGPT scale: conversations/s and peak RSS of clean, split and tokenization, 1 vs 2 workers.

    python benchmarks/bench_data.py                          # 200,000 and 20,000 generated conversations
    python benchmarks/bench_data.py --sizes 20000 2000       # quicker
    # in parts (each part appends to the JSON; the generated files stay in --workdir between parts):
    python benchmarks/bench_data.py --sizes 200000 --stages clean --workdir /tmp/bd --json bd.json
    python benchmarks/bench_data.py --sizes 200000 --stages split --workers 1 --workdir /tmp/bd --json bd.json
    python benchmarks/bench_data.py --summary bd.json        # the table, from every part measured

For each size N a ShareGPT JSON list of N conversations is generated (what a ShareGPT dump is: a quarter of the
replies as raw page HTML with code blocks and lists, the rest Markdown, "1 / 1" page counters, "Copy code"
headers glued to code, a few duplicates; 1 + geometric(0.45) exchanges, lognormal turn lengths, as
bench_batching's synthetic mix). Each stage then runs in a process of its own, so its peak RSS is its own:
`clean_file` -> `split_file` (SmolLM2 tokenizer, vicuna_v1.1, max_length 2048) -> `build_tokenized_dataset`,
with 1 and with 2 workers; the outputs of different worker counts must be the same bytes. Per stage and worker
count: conversations/s (input conversations, wall clock, process start included), CPU ms per conversation (all
processes; does not depend on what else runs on the machine), peak RSS of the main process and of the largest
worker, the time extrapolated to 1,000,000 conversations, and the peak RSS at the largest size over the peak
RSS at the smallest (target: <= 1.3, memory that does not grow with the data).
"""
from __future__ import annotations

import argparse
import filecmp
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = ("clean", "split", "tokenize")
TEMPLATE, MAX_LENGTH = "vicuna_v1.1", 2048
WORDS = ("the a model data train token python function value return list error answer question because which "
         "would could should example result output input system user chat code loop import class print file "
         "path test case more than less about when where what how why server request memory table query index "
         "network latency batch gradient layer weight learning rate time space string number array order "
         "customer email meeting plan week budget design color garden recipe travel history music story").split()
LANGUAGES = ("python", "javascript", "sql", "bash", "")


# ------------------------------------------------------------------------------------------ generated data

def _sentence(rng: random.Random, n: int) -> str:
    words = [rng.choice(WORDS) for _ in range(max(1, n))]
    return " ".join(words).capitalize() + rng.choice([".", ".", "?", "!"])


def _reply(rng: random.Random) -> tuple[str, str]:
    """(Markdown, ShareGPT page HTML) of one assistant reply."""
    md, html = [], []
    budget = max(8, int(rng.lognormvariate(4.6, 0.9)))  # words, as bench_batching's synthetic mix
    while budget > 0:
        kind = rng.random()
        if kind < 0.15:
            language = rng.choice(LANGUAGES)
            code = "\n".join(f"    {rng.choice(WORDS)} = {rng.choice(WORDS)}({rng.randint(0, 99)})"
                             for _ in range(rng.randint(2, 12)))
            md.append(f"```{language}\n{code}\n```")
            header = (f'<div class="flex items-center"><span>{language or "bash"}</span><button><svg></svg>Copy '
                      'code</button></div>')
            cls = f' class="!whitespace-pre hljs language-{language}"' if language else ""
            escaped = code.replace("&", "&amp;").replace("<", "&lt;")
            html.append(f'<pre><div class="bg-black">{header}<div><code{cls}>{escaped}\n</code></div></div></pre>')
            budget -= 20
        elif kind < 0.3:
            items = [_sentence(rng, rng.randint(4, 12)) for _ in range(rng.randint(2, 5))]
            md.append("\n".join(f"{i + 1}. {item}" for i, item in enumerate(items)))
            html.append("<ol>" + "".join(f"<li>{item}</li>" for item in items) + "</ol>")
            budget -= 8 * len(items)
        else:
            text = " ".join(_sentence(rng, rng.randint(6, 18)) for _ in range(rng.randint(1, 4)))
            md.append(text)
            html.append(f"<p>{text}</p>")
            budget -= len(text.split())
    return "\n\n".join(md), '<div class="markdown prose w-full break-words dark:prose-invert light">' + \
        "".join(html) + "</div>"


def _conversation(rng: random.Random, index: int) -> dict:
    as_html = rng.random() < 0.25
    counter = rng.random() < 0.1
    turns = []
    exchanges = 1
    while rng.random() > 0.45 and exchanges < 30:
        exchanges += 1
    for _ in range(exchanges):
        question = _sentence(rng, max(2, int(rng.lognormvariate(3.0, 1.0))))
        markdown, html = _reply(rng)
        if not as_html and rng.random() < 0.05:  # a text export's glued code header
            markdown = markdown.replace("```python\n", "```\npythonCopy code\n", 1)
        turns.append({"from": "human", "value": ("1 / 1" if counter else "") + question})
        turns.append({"from": "gpt", "value": html if as_html else markdown})
    return {"id": f"gen{index:07d}", "conversations": turns}


def generate(path: Path, n: int, seed: int = 0) -> None:
    """A ShareGPT JSON list of n conversations, written as it is generated; 0.5% are duplicates (new id)."""
    rng = random.Random(seed)
    earlier = []
    with open(path, "w", encoding="utf-8") as f:
        f.write("[\n")
        for i in range(n):
            if earlier and rng.random() < 0.005:
                record = {**rng.choice(earlier), "id": f"gen{i:07d}"}
            else:
                record = _conversation(rng, i)
                if len(earlier) < 1000:
                    earlier.append(record)
            f.write(("" if i == 0 else ",\n") + json.dumps(record, ensure_ascii=False))
        f.write("\n]\n")


# ---------------------------------------------------------------------------------- one stage, own process

def run_stage(stage: str, source: str, output: str, workers: int) -> dict:
    """Run one stage in this process; wall and CPU seconds (all processes), conversations, and peak RSS (MiB)
    of this process and of its largest worker."""
    start = time.perf_counter()
    if stage == "clean":
        from ds_vicuna.data.clean import clean_file

        report = clean_file(source, output, workers=workers, skip_bad=True, progress=False)
        conversations, detail = report.total, {"kept": report.kept, "skipped": report.as_dict()["skipped"]}
    elif stage == "split":
        from ds_vicuna.data.split import split_file
        from ds_vicuna.model.tokenizer import load_tokenizer

        report = split_file(source, output, load_tokenizer("embedded", TEMPLATE), TEMPLATE, MAX_LENGTH,
                            progress=False, workers=workers)
        conversations, detail = report.conversations, {"pieces": report.pieces, **report.as_dict()["events"]}
    else:
        from ds_vicuna.train.dataset import build_tokenized_dataset
        from ds_vicuna.model.tokenizer import load_tokenizer

        ds = build_tokenized_dataset(source, load_tokenizer("embedded", TEMPLATE), TEMPLATE, MAX_LENGTH,
                                     cache_dir=output, num_workers=workers, progress=False)
        conversations, detail = len(ds), {"tokens": int(ds.meta["num_tokens"]), "shards": len(ds.meta["shards"])}
    seconds = time.perf_counter() - start
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    return {"stage": stage, "workers": workers, "seconds": seconds, "cpu_seconds": cpu,
            "conversations": conversations, "rss_main_mib": own.ru_maxrss / 1024,
            "rss_worker_mib": children.ru_maxrss / 1024, **detail}


def stage_in_subprocess(stage: str, source: Path, output: Path, workers: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--run-stage", stage, str(source), str(output), str(workers)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{stage} with {workers} workers failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def same_output(stage: str, a: Path, b: Path) -> bool:
    if stage != "tokenize":
        return filecmp.cmp(a, b, shallow=False)
    [fa], [fb] = list(a.iterdir()), list(b.iterdir())
    names = sorted(p.name for p in fa.iterdir())
    return names == sorted(p.name for p in fb.iterdir()) and all(
        name == "meta.json" or filecmp.cmp(fa / name, fb / name, shallow=False) for name in names)


def bench_size(n: int, workdir: Path, workers: tuple[int, ...], stages: tuple[str, ...]) -> list[dict]:
    """Measure `stages` with each worker count on n generated conversations; files stay in `workdir`/n<N>."""
    folder = workdir / f"n{n}"
    folder.mkdir(parents=True, exist_ok=True)
    raw = folder / "raw.json"
    if not raw.is_file():
        started = time.perf_counter()
        generate(raw, n)
        print(f"\n{n} conversations: generated {raw.stat().st_size / 2**20:.0f} MiB in "
              f"{time.perf_counter() - started:.0f} s", flush=True)
    previous = {"clean": "raw", "split": "clean", "tokenize": "split"}
    results = []
    for stage in stages:
        source = raw if stage == "clean" else _input(folder, previous[stage])
        for w in workers:
            output = _output(folder, stage, w)
            if output.is_dir():  # a cache left by an earlier run would be loaded, not built
                shutil.rmtree(output)
            result = {"n": n, **stage_in_subprocess(stage, source, output, w)}
            results.append(result)
            print(f"  n={n} {stage:8} {w} worker(s): {result['conversations'] / result['seconds']:6.0f} conv/s  "
                  f"{result['seconds']:7.1f} s  {result['cpu_seconds'] / result['conversations'] * 1e3:5.1f} CPU "
                  f"ms/conv  RSS main {result['rss_main_mib']:5.0f} MiB, largest worker "
                  f"{result['rss_worker_mib']:5.0f} MiB", flush=True)
        outputs = [_output(folder, stage, w) for w in (1, 2)]
        if all(o.exists() for o in outputs):
            same = same_output(stage, *outputs)
            results[-1]["same_bytes"] = same
            print(f"  n={n} {stage:8} output identical for 1 and 2 workers: {same}", flush=True)
            if not same:
                raise SystemExit(f"{stage}: the outputs of 1 and 2 workers differ")
    return results


def _output(folder: Path, stage: str, workers: int) -> Path:
    return folder / (f"{stage}-w{workers}.jsonl" if stage != "tokenize" else f"cache-w{workers}")


def _input(folder: Path, stage: str) -> Path:
    """The output of `stage` (the same bytes for any worker count) that a later stage reads."""
    path = next((p for p in (_output(folder, stage, w) for w in (1, 2)) if p.exists()), None)
    if path is None:
        raise SystemExit(f"{_output(folder, stage, 1)} is missing: run the stage before it first (same --workdir)")
    return path


def summary(results: list[dict]) -> str:
    """One row per stage and worker count, at the largest size measured for it; the RSS ratio is against the
    smallest size measured for it (sizes may differ between stages when the large ones are run in parts)."""
    lines = ["| stage | workers | conversations | conv/s | CPU ms / conv | speedup with free cores | time | "
             "extrapolated to 1M | peak RSS main / worker (MiB) | smaller run: conversations, RSS main / worker "
             "(MiB) | RSS ratio |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for stage in STAGES:
        for w in sorted({r["workers"] for r in results}):
            runs = sorted((r for r in results if (r["stage"], r["workers"]) == (stage, w)), key=lambda r: r["n"])
            if not runs:
                continue
            s, b = runs[0], runs[-1]
            rate = b["conversations"] / b["seconds"]
            one = next((r for r in results if (r["n"], r["stage"], r["workers"]) == (b["n"], stage, 1)), None)
            # With w free cores the wall time shrinks w-fold, less the parallel overhead (more CPU per conversation).
            speedup = f"{w * one['cpu_seconds'] / b['cpu_seconds']:.2f}x" if one else "-"
            line = (f"| {stage} | {w} | {b['n']:,} | {rate:,.0f} | {b['cpu_seconds'] / b['conversations'] * 1e3:.1f} | "
                    f"{speedup} | {b['seconds'] / 60:.1f} min | {b['seconds'] * 1_000_000 / b['n'] / 3600:.2f} h | "
                    f"{b['rss_main_mib']:.0f} / {b['rss_worker_mib']:.0f} | ")
            if s is not b:
                ratio = max(b["rss_main_mib"], b["rss_worker_mib"]) / max(s["rss_main_mib"], s["rss_worker_mib"])
                line += f"{s['n']:,}: {s['rss_main_mib']:.0f} / {s['rss_worker_mib']:.0f} | {ratio:.2f} |"
            else:
                line += "- | - |"
            lines.append(line)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[200_000, 20_000])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the generated files here between parts (default: a temp dir, deleted after)")
    parser.add_argument("--json", type=Path, help="add every measurement to this JSON list")
    parser.add_argument("--summary", type=Path, help="only print the table from a --json file")
    parser.add_argument("--run-stage", nargs=4, metavar=("STAGE", "IN", "OUT", "WORKERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_stage:
        stage, source, output, workers = args.run_stage
        print(json.dumps(run_stage(stage, source, output, int(workers))))
        return
    if args.summary:
        print(summary(json.loads(args.summary.read_text())))
        return
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-data-"))
    print(f"cores: {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}; workdir {workdir}", flush=True)
    try:
        results = [r for n in sorted(args.sizes, reverse=True)
                   for r in bench_size(n, workdir, tuple(args.workers), tuple(args.stages))]
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        earlier = json.loads(args.json.read_text()) if args.json.is_file() else []
        measured = {(r["n"], r["stage"], r["workers"]) for r in results}
        results = [r for r in earlier if (r["n"], r["stage"], r["workers"]) not in measured] + results
        args.json.write_text(json.dumps(results, indent=1))
    print("\n" + summary(results))


if __name__ == "__main__":
    main()
