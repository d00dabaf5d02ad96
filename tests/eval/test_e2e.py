"""End to end with real processes: `ds-vicuna serve all --model embedded` answers and judges; summarize, plot;
then `eval run` with our server as one of the models and the scripted fake as the other model and the judge.

A 135M model judges badly; the point is the real path: answers from our own API, both judging modes through
the same API, unparsed judgments counted (not crashing, not scored), the summary and plots produced.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.support.fake_openai_judge import start_server

from ds_vicuna.eval.questions import load_questions

MODEL = "smol"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def api_url(tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log, "w") as handle:
        proc = subprocess.Popen([sys.executable, "-m", "ds_vicuna.cli", "serve", "all", "--model", "embedded",
                                 "--model-name", MODEL, "--port", str(port), "--max-batch-size", "6"],
                                stdout=handle, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"server exited early:\n{log.read_text()}"
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail(f"server not healthy in 240 s:\n{log.read_text()}")
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _eval(*args, timeout=400):
    done = subprocess.run([sys.executable, "-m", "ds_vicuna.cli", "eval", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"eval {args[0]} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _question_file(folder: Path) -> Path:
    """One Vicuna-80 question and one two-turn math question with references (3 question turns in all)."""
    picked = [q for q in load_questions("vicuna_80") if q.question_id == 1]
    picked += [q for q in load_questions("mt_bench_mini") if q.question_id == 102]
    path = folder / "questions.jsonl"
    with open(path, "w") as handle:
        for q in picked:
            record = {"question_id": q.question_id, "category": q.category}
            record.update({"text": q.turns[0]} if len(q.turns) == 1 else {"turns": list(q.turns)})
            if q.reference:
                record["reference"] = list(q.reference)
            handle.write(json.dumps(record) + "\n")
    return path


@pytest.mark.slow
def test_answer_judge_summarize_plot_through_our_server(tmp_path, api_url):
    questions = _question_file(tmp_path)
    client = ["--base-url", api_url, "--workers", "6", "--quiet", "--max-attempts", "3"]
    answers = []
    for model_id, temperature in (("smol-greedy", "0"), ("smol-hot", "1.0")):
        out = tmp_path / f"{model_id}.jsonl"
        _eval("answer", "--questions", questions, "--api-model", MODEL, "--model-id", model_id,
              "--temperature", temperature, "--max-tokens", "12", "--out", out, *client)
        answers.append(out)
        records = [json.loads(line) for line in out.read_text().splitlines()]
        assert sorted(r["question_id"] for r in records) == [1, 102]
        assert [len(r["choices"][0]["turns"]) for r in sorted(records, key=lambda r: r["question_id"])] == [1, 2]

    pairwise, single = tmp_path / "pairwise.jsonl", tmp_path / "single.jsonl"
    for mode, out in (("pairwise", pairwise), ("single", single)):
        printed = _eval("judge", "--questions", questions, "--answers", *answers, "--mode", mode, "--out", out,
                        "--model", MODEL, "--max-tokens", "16", *client)
        assert "0 failed" in printed
    judged = [json.loads(line) for line in pairwise.read_text().splitlines()]
    assert len(judged) == 3 and len({r["key"] for r in judged}) == 3  # 3 question turns, both orders in each
    assert {r["judge"][1] for r in judged} == {"pair-v2", "pair-math-v1", "pair-math-v1-multi-turn"}
    assert all(r["g1_judgment"] is not None and r["g2_judgment"] is not None for r in judged)

    summary = json.loads(_eval("summarize", "--json", pairwise, single))
    pair = summary[0]
    assert list(pair)[:9] == ["model_1", "model_2", "n", "score_1", "score_2", "wins_1", "ties", "wins_2",
                              "unparsed"]
    assert (pair["model_1"], pair["model_2"]) == ("smol-greedy", "smol-hot")
    assert pair["unparsed"] == sum((r["g1_winner"] == "error") + (r["g2_winner"] == "error") for r in judged)
    assert pair["n"] + pair["excluded"] == 3 and pair["wins_1"] + pair["ties"] + pair["wins_2"] == pair["n"]
    graded = [json.loads(line) for line in single.read_text().splitlines()]
    assert len(graded) == 6 and {r["judge"][1] for r in graded} == {"single-v1", "single-math-v1",
                                                                    "single-math-v1-multi-turn"}
    assert sum(m["unparsed"] + m["n"] for m in summary[1]["models"].values()) == 6

    (tmp_path / "summary.json").write_text(json.dumps(summary))
    pngs = _eval("plot", tmp_path / "summary.json", "--out-dir", tmp_path / "plots").split()
    assert "win_tie_loss.png" in [Path(p).name for p in pngs]
    assert all(Path(p).read_bytes()[:4] == b"\x89PNG" for p in pngs)


@pytest.mark.slow
def test_eval_run_with_our_server_as_one_model(tmp_path, api_url):
    fake, _ = start_server()
    fake_url = f"http://127.0.0.1:{fake.server_address[1]}/v1"
    try:
        printed = _eval("run", "--questions", _question_file(tmp_path), "--models", f"{api_url}={MODEL}",
                        f"{fake_url}=fake-q6", "--judge", f"{fake_url}=gpt-4", "--out", tmp_path / "run",
                        "--max-tokens", "12", "--workers", "4", "--quiet", "--bootstrap", "100",
                        "--max-attempts", "3")
    finally:
        fake.shutdown()
    assert "report ->" in printed
    answers = tmp_path / "run" / "model_answer" / f"{MODEL}.jsonl"
    ours = [json.loads(line) for line in answers.read_text().splitlines()]
    assert sorted(len(r["choices"][0]["turns"]) for r in ours) == [1, 2] and all(r["model_id"] == MODEL for r in ours)
    ratings = json.loads((tmp_path / "run" / "ratings.json").read_text())
    assert set(ratings["models"]) == {MODEL, "fake-q6"} and ratings["battles"] == 3
    report = (tmp_path / "run" / "report.md").read_text()
    assert "Every answer and judgment is in." in report and f"`{MODEL}`" in report
