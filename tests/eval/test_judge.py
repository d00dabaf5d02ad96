"""`eval judge` against the scripted fake judge: FastChat's record layout, both orders, Vicuna and MT-bench prompts,
parsing, totals, unparsed counting, resume."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.support.fake_openai_judge import start_server

from ds_vicuna.eval.answer_files import load_answers
from ds_vicuna.eval.judge import existing_keys, plan_tasks, run_judge
from ds_vicuna.eval.judge_client import ChatClient, RetryPolicy
from ds_vicuna.eval.judge_prompts import JudgeMode, load_prompt_set
from ds_vicuna.eval.judgments import read_judgments
from ds_vicuna.eval.questions import load_questions
from ds_vicuna.eval.summarize import summarize_loaded

TESTS = Path(__file__).resolve().parents[1]
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


def plan(folder, mode=JudgeMode.PAIRWISE, rows=QUESTIONS, prompts="mt_bench", **kwargs):
    questions, answers = write_inputs(folder, rows)
    return plan_tasks(load_questions(questions), [load_answers(p) for p in answers], mode, load_prompt_set(prompts),
                      **kwargs)


def lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def summary_of(path, **kwargs):
    return summarize_loaded(read_judgments(path), **kwargs)


SINGLE_TURN = [row for row in QUESTIONS if len(row[2]) == 1]
FASTCHAT_PAIR_FIELDS = {"question_id", "model_1", "model_2", "g1_winner", "g2_winner", "judge", "g1_user_prompt",
                        "g1_judgment", "g2_user_prompt", "g2_judgment", "turn", "tstamp"}


def test_vicuna_prompts_both_orders_in_one_record_scores_and_resume(tmp_path, server):
    plan_ = plan(tmp_path, rows=SINGLE_TURN, prompts="vicuna")
    out = tmp_path / "judgments.jsonl"
    stats = run_judge(plan_.tasks, client(server), out, workers=3, progress=False)
    assert (stats.written, stats.unparsed, stats.failed, stats.skipped) == (5, 2, 0, 0)
    records = {r["question_id"]: r for r in lines(out)}
    assert all(FASTCHAT_PAIR_FIELDS <= set(r) for r in records.values())
    q1 = records[1]  # beta better; game 2 shows beta first, so the judge's text reads "8 6"
    assert (q1["g1_winner"], q1["g2_winner"], q1["judge"]) == ("model_2", "model_2", ["fake-judge",
                                                                                      "vicuna-general-v1"])
    assert q1["g1_judgment"].startswith("6 8") and q1["g2_judgment"].startswith("8 6")
    assert (q1["g1_scores"], q1["g2_scores"], q1["answer_lengths"]) == ([6, 8], [8, 6], [9, 9])
    assert q1["g1_user_prompt"].index("quality=6") < q1["g1_user_prompt"].index("quality=8")
    assert q1["g2_user_prompt"].index("quality=8") < q1["g2_user_prompt"].index("quality=6")
    assert records[3]["judge"][1] == "vicuna-math-v1" and "Assistant 1: 9" in records[3]["g1_judgment"]
    assert records[2]["judge"][1] == "vicuna-coding-v1"
    garbage = records[4]
    assert (garbage["g1_winner"], garbage["g2_winner"], garbage["failures"]) == ("error", "error",
                                                                                 ["no_scores", "no_scores"])
    assert garbage["g1_judgment"]  # raw text kept

    summary = summary_of(out)[0]
    # q1 6/8 beta; q2 bias -> games disagree -> tie 7.5/7.5; q3 9/3 alpha; q6 5/5 tie after a 429;
    # q4 unparsed in both games -> excluded.
    assert {k: summary[k] for k in ("model_1", "model_2", "n", "score_1", "score_2", "wins_1", "ties", "wins_2",
                                    "unparsed", "excluded", "inconsistent")} == {
        "model_1": "alpha", "model_2": "beta", "n": 4, "score_1": 27.5, "score_2": 23.5, "wins_1": 1, "ties": 2,
        "wins_2": 1, "unparsed": 2, "excluded": 1, "inconsistent": 1}
    assert summary["relative_score"] == round(100 * 23.5 / 27.5, 2)
    assert summary["consistency"] == {"judged_both_orders": 4, "consistent": 3, "rate": 0.75,
                                      "inconsistent_favoring_first_shown": 1,
                                      "inconsistent_favoring_second_shown": 0, "inconsistent_with_a_tie": 0}
    assert summary["mismatches"] == []

    again = run_judge(plan_.tasks, client(server), out, workers=3, progress=False)
    assert (again.written, again.skipped) == (0, 5) and len(lines(out)) == 5


def test_mt_bench_prompts_verdicts_multi_turn_and_missing_reference(tmp_path, server):
    plan_ = plan(tmp_path)
    assert plan_.missing_reference == [(2, 1)]  # coding without a reference: general prompt, reported
    assert "judged WITHOUT a reference answer" in plan_.warnings()[0]
    out = tmp_path / "pair.jsonl"
    stats = run_judge(plan_.tasks, client(server), out, workers=3, progress=False)
    assert (stats.written, stats.unparsed) == (7, 2)
    records = {(r["question_id"], r["turn"]): r for r in lines(out)}
    assert {k: r["judge"][1] for k, r in records.items()} == {
        (1, 1): "pair-v2", (2, 1): "pair-v2", (3, 1): "pair-math-v1", (4, 1): "pair-v2", (5, 1): "pair-v2",
        (5, 2): "pair-v2-multi-turn", (6, 1): "pair-v2"}
    assert "[The Start of Reference Answer]\nref\n" in records[(3, 1)]["g1_user_prompt"]
    turn_2 = records[(5, 2)]
    assert "### User:\nQ5b" in turn_2["g1_user_prompt"] and turn_2["g1_judgment"].endswith("[[A]]")
    assert (turn_2["g1_winner"], turn_2["g2_winner"], turn_2["g1_scores"]) == ("model_1", "model_1", None)
    summary = summary_of(out)[0]
    assert {k: summary[k] for k in ("n", "score_1", "wins_1", "ties", "wins_2", "inconsistent", "excluded")} == {
        "n": 6, "score_1": None, "wins_1": 2, "ties": 2, "wins_2": 2, "inconsistent": 1, "excluded": 1}


def test_no_swap_plays_one_game_recorded_as_fastchat_does(tmp_path, server):
    tasks = plan(tmp_path, rows=SINGLE_TURN[:2], prompts="vicuna", swap=False).tasks
    out = tmp_path / "one.jsonl"
    assert run_judge(tasks, client(server), out, progress=False).written == 2
    q2 = {r["question_id"]: r for r in lines(out)}[2]  # alpha shown first gets the +1 bias: 8 vs 7
    assert (q2["games"], q2["g1_winner"], q2["g2_winner"], q2["g2_judgment"]) == (1, "model_1", "model_1", None)
    summary = summary_of(out)[0]
    assert (summary["wins_1"], summary["wins_2"], summary["consistency"]["judged_both_orders"]) == (1, 1, 0)


def test_failed_requests_write_nothing_and_are_retried_next_run(tmp_path, server):
    rows = QUESTIONS[:1] + [(7, "generic", ["Q7"], None, ["quality=2 #fake:500x3"], ["quality=3"])]
    tasks = plan(tmp_path, rows=rows).tasks
    out = tmp_path / "j.jsonl"
    # each game's prompt fails 3 times; 2 attempts per run: run 1 loses game 1, run 2 game 2, run 3 succeeds
    runs = [run_judge(tasks, client(server, attempts=2), out, workers=2, progress=False) for _ in range(3)]
    assert [(r.written, r.failed, r.skipped) for r in runs] == [(1, 1, 0), (0, 1, 1), (1, 0, 1)]
    assert sorted(r["key"] for r in lines(out)) == sorted(t.key for t in tasks)


def test_single_mode_grades_each_answer_reference_guided_for_math(tmp_path, server):
    plan_ = plan(tmp_path, mode=JudgeMode.SINGLE)
    out = tmp_path / "single.jsonl"
    stats = run_judge(plan_.tasks, client(server), out, workers=2, progress=False)
    assert (stats.written, stats.unparsed) == (14, 1)
    records = lines(out)
    assert all({"question_id", "model", "judge", "user_prompt", "judgment", "score", "turn", "tstamp"} <= set(r)
               for r in records)
    assert {r["judge"][1] for r in records if r["question_id"] == 3} == {"single-math-v1"}
    assert {(r["turn"], r["judge"][1]) for r in records if r["question_id"] == 5} == {
        (1, "single-v1"), (2, "single-v1-multi-turn")}
    assert next(r for r in records if r["question_id"] == 4 and r["model"] == "alpha")["score"] is None
    summary = summary_of(out)[0]["models"]
    assert {k: summary["alpha"][k] for k in ("n", "total", "mean", "unparsed", "categories", "turns")} == {
        "n": 6, "total": 40.0, "mean": round(40 / 6, 4), "unparsed": 1,
        "categories": {"coding": 7.0, "generic": 5.5, "math": 9.0, "writing": 6.5}, "turns": {"1": 6.2, "2": 9.0}}
    assert summary["beta"]["n"] == 7 and summary["beta"]["total"] == 39.0
    lo, hi = summary["beta"]["ci"]["mean"]
    assert lo <= 39 / 7 <= hi


def test_output_of_another_mode_or_layout_is_refused(tmp_path):
    out = tmp_path / "j.jsonl"
    out.write_text(json.dumps({"key": "k", "mode": "single", "model": "x"}) + "\n")
    with pytest.raises(ValueError, match="j.jsonl:1: holds a single judgment; write this pairwise run"):
        existing_keys(out, JudgeMode.PAIRWISE)
    out.write_text(json.dumps({"key": "k", "mode": "pairwise", "order": "12"}) + "\n")
    with pytest.raises(ValueError, match="holds a record in another layout"):
        existing_keys(out, JudgeMode.PAIRWISE)


def test_pairs_of_three_models_all_or_against_a_baseline(tmp_path):
    questions, answers = write_inputs(tmp_path, SINGLE_TURN[:2])
    gamma = tmp_path / "gamma.jsonl"
    gamma.write_text(answers[0].read_text().replace('"alpha"', '"gamma"'))
    loaded = [load_answers(p) for p in (*answers, gamma)]
    prompts = load_prompt_set("vicuna")
    every = plan_tasks(load_questions(questions), loaded, JudgeMode.PAIRWISE, prompts)
    assert sorted({t.models for t in every.tasks}) == [("alpha", "beta"), ("alpha", "gamma"), ("beta", "gamma")]
    baseline = plan_tasks(load_questions(questions), loaded, JudgeMode.PAIRWISE, prompts, baseline="gamma")
    assert sorted({t.models for t in baseline.tasks}) == [("gamma", "alpha"), ("gamma", "beta")]
    with pytest.raises(ValueError, match="baseline 'delta' is not among"):
        plan_tasks(load_questions(questions), loaded, JudgeMode.PAIRWISE, prompts, baseline="delta")


def test_pairwise_needs_two_different_models(tmp_path):
    questions, answers = write_inputs(tmp_path)
    loaded = load_answers(answers[0])
    with pytest.raises(ValueError, match="two or more"):
        plan_tasks(load_questions(questions), [loaded], JudgeMode.PAIRWISE, load_prompt_set("mt_bench"))
    with pytest.raises(ValueError, match="different models"):
        plan_tasks(load_questions(questions), [loaded, loaded], JudgeMode.PAIRWISE, load_prompt_set("mt_bench"))


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
        while time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 4):
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        written = out.read_text().count("\n")
        assert 4 <= written < 30, "the kill must land mid-run"
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert f"{30 - written} written" in done.stdout, done.stdout
    finally:
        srv.shutdown()
    records = lines(out)
    keys = [r["key"] for r in records]
    assert len(keys) == len(set(keys)) == 30
    assert summary_of(out)[0]["n"] == 30
