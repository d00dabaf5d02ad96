"""`eval judge` against the scripted fake judge: both orders, parsing, totals, unparsed counting, resume."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fake_openai_judge import start_server

from ds_vicuna.eval.answer import load_answers
from ds_vicuna.eval.judge import existing_keys, plan_tasks, run_judge
from ds_vicuna.eval.judge_client import ChatClient, RetryPolicy
from ds_vicuna.eval.judge_prompts import JudgeMode
from ds_vicuna.eval.questions import load_questions
from ds_vicuna.eval.summarize import summarize_file, summarize_single

TESTS = Path(__file__).parent
QUESTIONS = [  # (id, category, turns, reference, alpha's answer turns, beta's answer turns)
    (1, "generic", ["Q1"], None, ["quality=6"], ["quality=8"]),
    (2, "coding", ["Q2"], None, ["quality=7 #fake:bias"], ["quality=7"]),
    (3, "math", ["Q3"], ["ref"], ["quality=9"], ["quality=3"]),
    (4, "generic", ["Q4"], None, ["#fake:garbage"], ["quality=5"]),
    (5, "writing", ["Q5a", "Q5b"], None, ["quality=4", "quality=9"], ["quality=6", "quality=5"]),
    (6, "generic", ["Q6"], None, ["quality=5 #fake:429x1"], ["quality=5"]),
]


@pytest.fixture(scope="module")
def server():
    srv, state = start_server()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()


def write_inputs(folder: Path, rows=QUESTIONS):
    """Question file plus FastChat answer files for models alpha and beta."""
    with open(folder / "questions.jsonl", "w") as q, open(folder / "alpha.jsonl", "w") as a, \
            open(folder / "beta.jsonl", "w") as b:
        for qid, category, turns, reference, alpha, beta in rows:
            record = {"question_id": qid, "category": category}
            record.update({"text": turns[0]} if len(turns) == 1 else {"turns": turns})
            if reference:
                record["reference"] = reference
            q.write(json.dumps(record) + "\n")
            for handle, model, answer in ((a, "alpha", alpha), (b, "beta", beta)):
                out = {"question_id": qid, "answer_id": f"{model}-{qid}", "model_id": model}
                out.update({"text": answer[0]} if len(turns) == 1 else {"choices": [{"index": 0, "turns": answer}]})
                handle.write(json.dumps(out) + "\n")
    return folder / "questions.jsonl", [folder / "alpha.jsonl", folder / "beta.jsonl"]


def client(base_url, attempts=4):
    return ChatClient(base_url, "fake-judge", retry=RetryPolicy(max_attempts=attempts, base_wait=0.01))


def plan(folder, mode=JudgeMode.PAIRWISE, rows=QUESTIONS):
    questions, answers = write_inputs(folder, rows)
    return plan_tasks(load_questions(questions), [load_answers(p) for p in answers], mode)[0]


def lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_pairwise_both_orders_totals_unparsed_and_resume(tmp_path, server):
    tasks = plan(tmp_path)
    out = tmp_path / "judgments.jsonl"
    stats = run_judge(tasks, client(server), out, workers=3, progress=False)
    assert (stats.written, stats.unparsed, stats.failed, stats.skipped) == (14, 2, 0, 0)
    records = lines(out)
    assert len({r["key"] for r in records}) == 14
    swapped = next(r for r in records if r["question_id"] == 1 and r["order"] == "21")
    assert swapped["text"].startswith("8 6") and (swapped["score_1"], swapped["score_2"]) == (6, 8)
    math = next(r for r in records if r["question_id"] == 3)
    assert math["prompt"] == "pair-math-ref" and "Assistant 1:" in math["text"] and math["parsed"]
    garbage = [r for r in records if r["question_id"] == 4]
    assert all(not r["parsed"] and r["failure"] == "no_scores" and r["score_1"] is None for r in garbage)
    assert all(r["text"] for r in garbage)  # raw text kept

    summary = summarize_file(out).as_dict()
    # q1 6/8 beta; q2 bias -> orders disagree -> tie 7.5/7.5; q3 9/3 alpha; q5 turn 1 4/6 beta, turn 2 9/5
    # alpha; q6 5/5 tie after a 429; q4 unparsed in both orders -> excluded.
    assert {k: summary[k] for k in ("model_1", "model_2", "n", "score_1", "score_2", "wins_1", "ties", "wins_2",
                                    "unparsed", "excluded", "inconsistent")} == {
        "model_1": "alpha", "model_2": "beta", "n": 6, "score_1": 40.5, "score_2": 34.5, "wins_1": 2, "ties": 2,
        "wins_2": 2, "unparsed": 2, "excluded": 1, "inconsistent": 1}
    assert summary["relative_score"] == round(100 * 34.5 / 40.5, 2)
    assert summary["categories"]["writing"]["n"] == 2

    again = run_judge(tasks, client(server), out, workers=3, progress=False)
    assert (again.written, again.skipped) == (0, 14) and len(lines(out)) == 14


def test_failed_requests_write_nothing_and_are_retried_next_run(tmp_path, server):
    rows = QUESTIONS[:1] + [(7, "generic", ["Q7"], None, ["quality=2 #fake:500x3"], ["quality=3"])]
    tasks = plan(tmp_path, rows=rows)
    out = tmp_path / "j.jsonl"
    first = run_judge(tasks, client(server, attempts=2), out, workers=2, progress=False)
    assert (first.written, first.failed) == (2, 2)
    second = run_judge(tasks, client(server, attempts=2), out, workers=2, progress=False)
    assert (second.written, second.failed, second.skipped) == (2, 0, 2)
    assert sorted(r["key"] for r in lines(out)) == sorted(t.key for t in tasks)


def test_single_mode_grades_each_answer_reference_guided_for_math(tmp_path, server):
    tasks = plan(tmp_path, mode=JudgeMode.SINGLE)
    out = tmp_path / "single.jsonl"
    stats = run_judge(tasks, client(server), out, workers=2, progress=False)
    assert (stats.written, stats.unparsed) == (14, 1)
    records = lines(out)
    assert {r["prompt"] for r in records if r["question_id"] == 3} == {"single-math-ref"}
    assert {r["prompt"] for r in records if r["question_id"] == 5} == {"single-general", "single-general-multi"}
    summary = summarize_single(out)["models"]
    assert summary["alpha"] == {"n": 6, "total": 40.0, "mean": round(40 / 6, 4), "unparsed": 1,
                                "categories": {"coding": 7.0, "generic": 5.5, "math": 9.0, "writing": 6.5}}
    assert summary["beta"]["n"] == 7 and summary["beta"]["total"] == 39.0


def test_output_of_another_comparison_is_refused(tmp_path):
    out = tmp_path / "j.jsonl"
    out.write_text(json.dumps({"key": "k", "mode": "pairwise", "model_1": "x", "model_2": "y"}) + "\n")
    with pytest.raises(ValueError, match="j.jsonl:1: holds a pairwise judgment of \\['x', 'y'\\]"):
        existing_keys(out, JudgeMode.PAIRWISE, ("alpha", "beta"))


def test_pairwise_needs_two_different_models(tmp_path):
    questions, answers = write_inputs(tmp_path)
    loaded = load_answers(answers[0])
    with pytest.raises(ValueError, match="exactly two"):
        plan_tasks(load_questions(questions), [loaded], JudgeMode.PAIRWISE)
    with pytest.raises(ValueError, match="different models"):
        plan_tasks(load_questions(questions), [loaded, loaded], JudgeMode.PAIRWISE)


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_has_no_duplicates_or_losses(tmp_path):
    srv, _ = start_server(delay=0.05)
    base_url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
    rows = [(i, "generic", [f"Q{i}"], None, [f"quality={i % 10 + 1}"], ["quality=5"]) for i in range(1, 31)]
    questions, answers = write_inputs(tmp_path, rows)
    out = tmp_path / "judgments.jsonl"
    cmd = [sys.executable, "-m", "ds_vicuna.eval.cli", "judge", "--questions", str(questions), "--answers",
           *map(str, answers), "--out", str(out), "--base-url", base_url, "--model", "fake", "--workers", "2",
           "--quiet"]
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 8):
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        written = out.read_text().count("\n")
        assert 8 <= written < 60, "the kill must land mid-run"
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert f"{60 - written} written" in done.stdout, done.stdout
    finally:
        srv.shutdown()
    records = lines(out)
    keys = [r["key"] for r in records]
    assert len(keys) == len(set(keys)) == 60
    assert summarize_file(out).as_dict()["n"] == 30
