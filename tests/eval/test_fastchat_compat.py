"""FastChat's llm_judge round trip: our answer and judgment files carry what FastChat's code reads, and we read
FastChat's own files.

FastChat is not a dependency. The field lists below are what `fastchat/llm_judge/common.py` (load_model_answers,
run_judge_single/pair, load_*_model_judgments) and `show_result.py` read, at commit 0e6d3e4b. Two optional tests
use a FastChat checkout: set DS_VICUNA_FASTCHAT_DIR to its root (for `fastchat/llm_judge/data`, and for
`show_result.py` when pandas is installed), and DS_VICUNA_VICUNA_REVIEWS to the Vicuna post's review folder
(`fastchat/eval/table/review/vicuna-13b_20230322-clean-lang` in FastChat before commit a0ba8c97).
"""
import hashlib
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from tests.support.fake_openai_judge import start_server

from ds_vicuna.data.question_sets import resolve_question_set
from ds_vicuna.eval.answer import ApiBackend, run_answers
from ds_vicuna.eval.answer_files import load_answers
from ds_vicuna.eval.judge import plan_tasks, run_judge
from ds_vicuna.eval.judge_client import ChatClient, RetryPolicy
from ds_vicuna.eval.judge_prompts import JudgeMode, load_prompt_set, prompt_set_path
from ds_vicuna.eval.judgments import read_judgments, read_many
from ds_vicuna.eval.questions import load_question_set, load_questions
from ds_vicuna.eval.summarize import relative_quality, summarize_loaded

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "fastchat"
FASTCHAT_DIR = os.environ.get("DS_VICUNA_FASTCHAT_DIR")
VICUNA_REVIEWS = os.environ.get("DS_VICUNA_VICUNA_REVIEWS")
WINNERS = {"model_1", "model_2", "tie", "error"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A FastChat-style data folder made by our code: model_answer/ and model_judgment/ against the fake judge."""
    folder = tmp_path_factory.mktemp("mt_bench")
    srv, _ = start_server()
    url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
    try:
        questions = load_question_set(ASSETS / "question.jsonl", ASSETS / "reference_answer_gpt-4.jsonl")
        for model in ("alpha-q8", "beta-q5"):
            client = ChatClient(url, model, retry=RetryPolicy(max_attempts=3, base_wait=0.01))
            run_answers(questions, ApiBackend(client, workers=2), folder / "model_answer" / f"{model}.jsonl", model,
                        progress=False)
        answers = [load_answers(folder / "model_answer" / f"{m}.jsonl") for m in ("alpha-q8", "beta-q5")]
        judge = ChatClient(url, "gpt-4", retry=RetryPolicy(max_attempts=3, base_wait=0.01))
        for mode, name in ((JudgeMode.SINGLE, "single"), (JudgeMode.PAIRWISE, "pair")):
            plan = plan_tasks(questions, answers, mode, load_prompt_set("mt_bench"))
            run_judge(plan.tasks, judge, folder / "model_judgment" / f"gpt-4_{name}.jsonl", progress=False)
    finally:
        srv.shutdown()
    return folder


def test_answers_have_what_fastchat_gen_judgment_reads(run_dir):
    questions = [json.loads(line) for line in (ASSETS / "question.jsonl").read_text().splitlines()]
    for path in sorted((run_dir / "model_answer").glob("*.jsonl")):
        # common.load_model_answers: model name = file name, answers keyed by question_id
        by_id = {r["question_id"]: r for r in map(json.loads, path.read_text().splitlines())}
        assert set(by_id) == {q["question_id"] for q in questions}
        for q in questions:
            turns = by_id[q["question_id"]]["choices"][0]["turns"]  # run_judge_*: answer["choices"][0]["turns"][i]
            assert len(turns) == len(q["turns"]) and all(isinstance(t, str) and t for t in turns)
            assert by_id[q["question_id"]]["model_id"] == path.stem


def test_judgments_have_what_fastchat_loaders_and_show_result_read(run_dir):
    single = [json.loads(line) for line in (run_dir / "model_judgment" / "gpt-4_single.jsonl").read_text().splitlines()]
    pair = [json.loads(line) for line in (run_dir / "model_judgment" / "gpt-4_pair.jsonl").read_text().splitlines()]
    assert len(single) == 2 * 10 and len(pair) == 10  # 5 questions x 2 turns (x 2 models for grades)
    for r in single:  # load_single_model_judgments + show_result --mode single
        assert isinstance(r["judge"], list) and len(r["judge"]) == 2 and r["judge"][0] == "gpt-4"
        assert {"question_id", "model", "score", "judgment", "turn"} <= set(r)
        assert r["turn"] in (1, 2) and (r["score"] is None or isinstance(r["score"], (int, float)))
    for r in pair:  # load_pairwise_model_judgments + show_result --mode pairwise-all
        assert isinstance(r["judge"], list) and r["judge"][1] in {p.name for p in load_prompt_set("mt_bench").prompts}
        assert {"question_id", "model_1", "model_2", "g1_judgment", "g2_judgment", "turn"} <= set(r)
        assert r["g1_winner"] in WINNERS and r["g2_winner"] in WINNERS
    # show_result's arithmetic, done by hand, agrees with our summary
    per_model = defaultdict(list)
    for r in single:
        if r["score"] not in (None, -1):
            per_model[(r["model"], r["turn"])].append(r["score"])
    ours = summarize_loaded(read_judgments(run_dir / "model_judgment" / "gpt-4_single.jsonl"))[0]["models"]
    for (model, turn), scores in per_model.items():
        assert ours[model]["turns"][str(turn)] == round(sum(scores) / len(scores), 4)
    counts = {"win": 0, "loss": 0, "tie": 0}
    for r in pair:
        if "error" in (r["g1_winner"], r["g2_winner"]):
            continue
        if r["g1_winner"] == "tie" or r["g1_winner"] != r["g2_winner"]:
            counts["tie"] += 1
        else:
            counts["win" if r["g1_winner"] == "model_1" else "loss"] += 1
    summary = summarize_loaded(read_judgments(run_dir / "model_judgment" / "gpt-4_pair.jsonl"))[0]
    assert (summary["wins_1"], summary["ties"], summary["wins_2"]) == (counts["win"], counts["tie"], counts["loss"])
    assert summary["wins_1"] >= 8  # alpha (quality 7-9) beats beta (4-6) on every turn


@pytest.mark.skipif(not FASTCHAT_DIR, reason="set DS_VICUNA_FASTCHAT_DIR to a FastChat checkout to read its files")
def test_fastchat_own_data_files():
    data = Path(FASTCHAT_DIR) / "fastchat" / "llm_judge" / "data"
    for bench in ("mt_bench", "vicuna_bench"):
        questions = load_question_set(data / bench / "question.jsonl",
                                      data / bench / "reference_answer" / "gpt-4.jsonl")
        assert len(questions) == 80
        assert (data / bench / "question.jsonl").read_bytes() == resolve_question_set(bench).questions.read_bytes()
        assert len(load_questions(data / bench / "question.jsonl")) == 80
    prompts = load_prompt_set(data / "judge_prompts.jsonl")
    assert len(prompts.prompts) == 8
    assert hashlib.sha256((data / "judge_prompts.jsonl").read_bytes()).digest() == \
        hashlib.sha256(prompt_set_path("mt_bench").read_bytes()).digest()


@pytest.mark.skipif(not FASTCHAT_DIR, reason="set DS_VICUNA_FASTCHAT_DIR to a FastChat checkout to run its "
                                             "show_result.py")
def test_fastchat_show_result_reads_our_judgments(run_dir):
    pytest.importorskip("pandas", reason="FastChat's show_result.py needs pandas")
    script = Path(FASTCHAT_DIR) / "fastchat" / "llm_judge" / "show_result.py"
    for mode, name in (("single", "single"), ("pairwise-all", "pair")):
        done = subprocess.run([sys.executable, str(script), "--mode", mode, "--input-file",
                               str(run_dir / "model_judgment" / f"gpt-4_{name}.jsonl")],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "alpha-q8" in done.stdout and "beta-q5" in done.stdout


@pytest.mark.skipif(not VICUNA_REVIEWS, reason="set DS_VICUNA_VICUNA_REVIEWS to the Vicuna post's review folder")
def test_vicuna_post_table_2_and_figure_1_from_the_raw_gpt4_reviews():
    folder = Path(VICUNA_REVIEWS)
    files = [folder / f"review_{m}_vicuna-13b.jsonl" for m in ("alpaca-13b", "bard", "gpt35", "llama-13b")]
    totals = {}
    for stored in (False, True):
        for f in read_many(files, stored=stored):
            s = summarize_loaded(f, stored)[0]
            totals[(s["model_1"], stored)] = (s["score_1"], s["score_2"], len(s["mismatches"]))
    # the post's Table 2 (stored scores): LLaMA 513.0 / 694.0, Alpaca 583.0 / 704.0, Bard 664.0 / 655.5,
    # ChatGPT 693.0 / 638.0; question 70's text says 4 where the stored score says 2 (two files)
    assert {m: t for (m, stored), t in totals.items() if stored} == {
        "alpaca-13b": (583.0, 704.0, 0), "bard": (664.0, 655.5, 1), "gpt35": (693.0, 638.0, 0),
        "llama-13b": (513.0, 694.0, 1)}
    assert totals[("bard", False)] == (664.0, 657.5, 1) and totals[("llama-13b", False)] == (513.0, 696.0, 1)
    # Figure 1: relative to ChatGPT, LLaMA 68%, Alpaca 76%, Vicuna 92%, Bard 93%
    view = relative_quality(read_many(files, stored=True), "gpt35")
    assert {m: round(v["relative"]) for m, v in view["models"].items()} == {
        "gpt35": 100, "bard": 93, "vicuna-13b": 92, "alpaca-13b": 76, "llama-13b": 68}
