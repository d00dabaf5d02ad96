"""Judge throughput: 1 request in flight vs `--workers 8`, against a local judge with fixed latency.

    python benchmarks/bench_eval_judge.py [--latency 0.2] [--questions 40]

A hosted judge spends most of each call waiting on the network and the remote model, so the wall time of a
Vicuna-80 run is set by how many requests are in flight. Prints both wall times and the speed-up ratio.
The benchmark writes its own questions and answers and runs its own judge: a stdlib OpenAI-style server that
waits `--latency` seconds and answers every Vicuna review prompt with the same two scores.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from ds_vicuna.eval.answer_files import load_answers
from ds_vicuna.eval.judge import plan_tasks, run_judge
from ds_vicuna.eval.judge_client import ChatClient, RetryPolicy
from ds_vicuna.eval.judge_prompts import JudgeMode, load_prompt_set
from ds_vicuna.eval.questions import load_questions

REVIEW = "8 6\nBoth answers address the question; the first is more detailed."  # Vicuna's pairwise score line


def start_judge(latency: float) -> ThreadingHTTPServer:
    """A chat-completions server on a free 127.0.0.1 port that sleeps `latency` s, then replies REVIEW."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            time.sleep(latency)
            data = json.dumps({"id": "x", "object": "chat.completion", "model": body.get("model"),
                               "choices": [{"index": 0, "finish_reason": "stop",
                                            "message": {"role": "assistant", "content": REVIEW}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def write_inputs(folder: Path, questions: int) -> tuple[Path, list[Path]]:
    """A single-turn question file and FastChat answer files of two models, `questions` records each."""
    paths = {"questions": folder / "questions.jsonl", "alpha": folder / "alpha.jsonl", "beta": folder / "beta.jsonl"}
    rows = {name: [] for name in paths}
    for qid in range(1, questions + 1):
        rows["questions"].append({"question_id": qid, "category": "generic", "text": f"Question {qid}?"})
        for model in ("alpha", "beta"):
            rows[model].append({"question_id": qid, "answer_id": f"{model}-{qid}", "model_id": model,
                                "choices": [{"index": 0, "turns": [f"{model} answers question {qid}."]}]})
    for name, path in paths.items():
        path.write_text("".join(json.dumps(row) + "\n" for row in rows[name]))
    return paths["questions"], [paths["alpha"], paths["beta"]]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--latency", type=float, default=0.2, help="seconds the judge takes per request")
    parser.add_argument("--questions", type=int, default=40)
    args = parser.parse_args()
    server = start_judge(args.latency)
    base_url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    timings = {}
    with tempfile.TemporaryDirectory() as tmp:
        questions, answers = write_inputs(Path(tmp), args.questions)
        tasks = plan_tasks(load_questions(questions), [load_answers(p) for p in answers], JudgeMode.PAIRWISE,
                           load_prompt_set("vicuna")).tasks
        for workers in (1, 8):
            client = ChatClient(base_url, "judge", retry=RetryPolicy(max_attempts=2, base_wait=0.01))
            start = time.perf_counter()
            stats = run_judge(tasks, client, Path(tmp) / f"w{workers}.jsonl", workers=workers, progress=False)
            timings[workers] = time.perf_counter() - start
            assert stats.written == len(tasks) and stats.unparsed == 0, stats
    server.shutdown()
    print(f"{len(tasks)} pairwise records ({2 * len(tasks)} judge requests, both orders), "
          f"judge latency {args.latency:.2f} s")
    print(f"workers=1: {timings[1]:.2f} s   workers=8: {timings[8]:.2f} s   speed-up x{timings[1] / timings[8]:.1f}")


if __name__ == "__main__":
    main()
