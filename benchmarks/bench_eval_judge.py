"""Judge throughput: 1 request in flight vs `--workers 8`, against a local fake judge with fixed latency.

    python benchmarks/bench_eval_judge.py [--latency 0.2] [--questions 40]

A hosted judge spends most of each call waiting on the network and the remote model, so the wall time of a
Vicuna-80 run is set by how many requests are in flight. Prints both wall times and the speed-up ratio.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.fake_openai_judge
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # what tests/eval/test_judge.py imports

from ds_vicuna.eval.answer_files import load_answers  # noqa: E402
from ds_vicuna.eval.judge import plan_tasks, run_judge  # noqa: E402
from ds_vicuna.eval.judge_client import ChatClient, RetryPolicy  # noqa: E402
from ds_vicuna.eval.judge_prompts import JudgeMode, load_prompt_set  # noqa: E402
from ds_vicuna.eval.questions import load_questions  # noqa: E402
from tests.support.fake_openai_judge import start_server  # noqa: E402
from tests.test_judge import write_inputs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--latency", type=float, default=0.2, help="seconds the fake judge takes per request")
    parser.add_argument("--questions", type=int, default=40)
    args = parser.parse_args()
    server, _ = start_server(delay=args.latency)
    base_url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    rows = [(i, "generic", [f"Q{i}"], None, [f"quality={i % 10 + 1}"], ["quality=6"])
            for i in range(1, args.questions + 1)]
    timings = {}
    with tempfile.TemporaryDirectory() as tmp:
        questions, answers = write_inputs(Path(tmp), rows)
        tasks = plan_tasks(load_questions(questions), [load_answers(p) for p in answers], JudgeMode.PAIRWISE,
                           load_prompt_set("vicuna")).tasks
        for workers in (1, 8):
            client = ChatClient(base_url, "fake", retry=RetryPolicy(max_attempts=2, base_wait=0.01))
            start = time.perf_counter()
            stats = run_judge(tasks, client, Path(tmp) / f"w{workers}.jsonl", workers=workers, progress=False)
            timings[workers] = time.perf_counter() - start
            assert stats.written == len(tasks)
    server.shutdown()
    print(f"{len(tasks)} pairwise records ({2 * len(tasks)} judge requests, both orders), "
          f"judge latency {args.latency:.2f} s")
    print(f"workers=1: {timings[1]:.2f} s   workers=8: {timings[8]:.2f} s   speed-up x{timings[1] / timings[8]:.1f}")


if __name__ == "__main__":
    main()
