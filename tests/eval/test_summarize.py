"""`eval summarize` on Vicuna review files, FastChat's model_judgment files and ours: exact --json output."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ds_vicuna.eval.judgments import read_judgments
from ds_vicuna.data.jsonl import RecordError
from ds_vicuna.eval.summarize import Options, relative_quality, summarize_loaded

ASSETS = Path(__file__).resolve().parents[1] / "assets"
LEGACY = ASSETS / "review_alpaca-13b_vicuna-13b.jsonl"
OURS_PER_ORDER = ASSETS / "judgments_gpt-x_ours.jsonl"  # the older one-record-per-order layout
FASTCHAT_PAIR = ASSETS / "fastchat" / "model_judgment" / "gpt-4_pair.jsonl"
FASTCHAT_SINGLE = ASSETS / "fastchat" / "model_judgment" / "gpt-4_single.jsonl"
CONTRACT = ["model_1", "model_2", "n", "score_1", "score_2", "wins_1", "ties", "wins_2", "unparsed"]


def run_cli(*args):
    done = subprocess.run([sys.executable, "-m", "ds_vicuna.eval.cli", "summarize", *map(str, args)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_json_output_one_object_per_pair_in_input_order():
    out = json.loads(run_cli(LEGACY, OURS_PER_ORDER, "--json"))
    assert [list(o)[:9] for o in out] == [CONTRACT, CONTRACT]
    # Legacy: scores re-read from `text` (q4 stored -1 but its text has "Assistant 1: 3 / Assistant 2: 10";
    # q6 stored [1, 1] but its text says 6.5 8.5); q5 is unparseable.
    assert {k: out[0][k] for k in CONTRACT} == {
        "model_1": "alpaca-13b", "model_2": "vicuna-13b", "n": 5, "score_1": 33.5, "score_2": 41.5,
        "wins_1": 1, "ties": 1, "wins_2": 3, "unparsed": 1}
    # Ours: q1 both orders agree (means 8.5 / 6.5), q2 orders disagree -> tie 7.5 / 7.5, q3 one order
    # unparsed -> left out of totals entirely.
    assert {k: out[1][k] for k in CONTRACT} == {
        "model_1": "gpt-x", "model_2": "ours", "n": 2, "score_1": 16.0, "score_2": 14.0,
        "wins_1": 1, "ties": 1, "wins_2": 0, "unparsed": 1}
    legacy = out[0]
    assert {k: legacy[k] for k in ("relative_score", "win_rate_1", "tie_rate", "win_rate_2", "inconsistent",
                                   "excluded", "source", "judges", "mean_1", "mean_2", "preference_2")} == {
        "relative_score": 123.88, "win_rate_1": 0.2, "tie_rate": 0.2, "win_rate_2": 0.6, "inconsistent": 0,
        "excluded": 1, "source": "vicuna-review", "judges": ["gpt-4-0328-default", "gpt-4-0328-coding",
                                                            "gpt-4-0328-math"],
        "mean_1": 6.7, "mean_2": 8.3, "preference_2": 0.7}
    assert legacy["categories"] == {"unknown": {
        "n": 5, "score_1": 33.5, "score_2": 41.5, "wins_1": 1, "ties": 1, "wins_2": 3, "relative_score": 123.88,
        "win_rate_1": 0.2, "tie_rate": 0.2, "win_rate_2": 0.6, "inconsistent": 0}}
    # every interval holds its point estimate
    for key, value in (("score_1", 33.5), ("relative_score", 123.88), ("win_rate_2", 0.6), ("preference_2", 0.7)):
        assert legacy["ci"][key][0] <= value <= legacy["ci"][key][1], key
    assert (out[1]["inconsistent"], out[1]["excluded"], out[1]["relative_score"]) == (1, 1, 87.5)
    assert out[1]["categories"]["generic"]["score_1"] == 8.5


def test_stored_score_disagreements_are_always_reported_and_stored_scores_reproduce_the_file():
    text_based = json.loads(run_cli(LEGACY, "--json"))[0]
    assert [(m["question_id"], m["stored"], m["text"]) for m in text_based["mismatches"]] == [
        (4, None, [3.0, 10.0]), (6, [1.0, 1.0], [6.5, 8.5])]
    stored = json.loads(run_cli(LEGACY, "--json", "--stored-scores"))[0]
    # stored: q4 [-1, -1] counts as unparsed (excluded), q6 [1, 1] is used as stored
    assert {k: stored[k] for k in ("n", "score_1", "score_2", "unparsed", "stored_scores")} == {
        "n": 4, "score_1": 25.0, "score_2": 24.0, "unparsed": 2, "stored_scores": True}
    assert len(stored["mismatches"]) == 2
    table = run_cli(LEGACY)
    assert "2 record(s) whose stored score disagrees with the judge's text (the judge's text used)" in table
    assert "line 6: question 6 turn 1: stored [1.0, 1.0], text [6.5, 8.5]" in table


def test_fastchat_model_judgment_files():
    out = json.loads(run_cli(FASTCHAT_PAIR, FASTCHAT_SINGLE, "--json", "--questions",
                             ASSETS / "fastchat" / "question.jsonl"))
    assert [(o.get("model_1"), o.get("model_2"), o.get("mode")) for o in out] == [
        ("vicuna-13b", "gpt-3.5-turbo", None), ("llama-13b", "gpt-3.5-turbo", None), (None, None, "single")]
    vicuna = out[0]
    # turn 1: 81 B, 103 A, 111 games disagree (position bias), 123 tie, 133 an "error" game (excluded);
    # turn 2: 81 A, 103: FastChat stored model_1 for game 1, its text's final verdict is [[B]] -> model_2
    assert {k: vicuna[k] for k in CONTRACT + ["excluded", "inconsistent", "source"]} == {
        "model_1": "vicuna-13b", "model_2": "gpt-3.5-turbo", "n": 6, "score_1": None, "score_2": None,
        "wins_1": 2, "ties": 2, "wins_2": 2, "unparsed": 1, "excluded": 1, "inconsistent": 1, "source": "fastchat"}
    assert vicuna["consistency"]["rate"] == round(5 / 6, 4)
    assert vicuna["consistency"]["inconsistent_favoring_first_shown"] == 1
    assert vicuna["mismatches"] == [{"line": 7, "question_id": 103, "turn": 2,
                                     "models": ["vicuna-13b", "gpt-3.5-turbo"],
                                     "stored": {"winner": "model_1", "scores": None},
                                     "text": {"winner": "model_2", "scores": None}}]
    assert set(vicuna["categories"]) == {"writing", "reasoning", "math", "coding"}
    single = out[2]["models"]
    assert {m: (s["n"], s["mean"], s["unparsed"], s["turns"]) for m, s in single.items()} == {
        "vicuna-13b": (3, 7.0, 1, {"1": 7.0, "2": 7.0}), "gpt-3.5-turbo": (4, 8.0, 0, {"1": 8.0, "2": 8.0})}
    # 111's stored 3 disagrees with its text's [[5]]: text used, reported
    assert [(m["question_id"], m["stored"], m["text"]) for m in out[2]["mismatches"]] == [(111, 3.0, 5.0)]
    stored = json.loads(run_cli(FASTCHAT_PAIR, "--json", "--stored-scores"))[0]
    assert (stored["wins_2"], stored["ties"], stored["inconsistent"]) == (1, 3, 2)


def test_relative_quality_from_grades_and_from_chained_pair_totals(tmp_path):
    graded = relative_quality([read_judgments(FASTCHAT_SINGLE)], "gpt-3.5-turbo", options=Options(resamples=200))
    # over the turns both were graded on (81/1, 103/1, 81/2; vicuna's 111 is unparsed): 21 / 27
    assert graded["source"] == "single" and graded["models"]["vicuna-13b"]["relative"] == round(100 * 21 / 27, 2)
    low, high = graded["models"]["vicuna-13b"]["ci"]
    assert low <= 100 * 21 / 27 <= high
    # a star of comparisons through a hub, as in the Vicuna post: A vs hub 50/100, B vs hub 80/100 -> B is 160% of A
    rows = [("a_hub", "a", 5, 10), ("b_hub", "b", 8, 10)]
    for name, model, mine, hub in rows:
        (tmp_path / f"review_{model}_hub.jsonl").write_text("".join(
            json.dumps({"review_id": f"{name}{q}", "question_id": q, "text": f"{mine} {hub}\nok",
                        "score": [mine, hub]}) + "\n" for q in range(1, 11)))
    loaded = [read_judgments(tmp_path / f"review_{m}_hub.jsonl") for m in ("a", "b")]
    view = relative_quality(loaded, "a", options=Options(resamples=200))
    assert view["source"] == "pairwise"
    assert {m: v["relative"] for m, v in view["models"].items()} == {"b": 160.0, "hub": 200.0, "a": 100.0}
    assert view["models"]["b"]["ci"] == [160.0, 160.0]  # identical scores on every question: no spread


def test_reversed_input_order_reverses_output():
    out = json.loads(run_cli(OURS_PER_ORDER, LEGACY, "--json"))
    assert [o["model_1"] for o in out] == ["gpt-x", "alpaca-13b"]


def test_legacy_categories_from_question_file():
    out = json.loads(run_cli(LEGACY, "--json", "--questions", "vicuna_80"))
    assert set(out[0]["categories"]) == {"generic"}  # ids 1-6 are generic in vicuna_80


def test_table_output_names_the_pair_counts_and_intervals():
    text = run_cli(LEGACY)
    assert "alpaca-13b vs vicuna-13b: n=5  total 33.5 / 41.5  relative 123.9% [" in text
    assert "unparsed 1" in text and "win rate vicuna-13b 60.0% [" in text


def test_legacy_name_without_two_models_is_rejected(tmp_path):
    bad = tmp_path / "review_a_b_c.jsonl"
    bad.write_text(LEGACY.read_text())
    with pytest.raises(RecordError, match="review_<model1>_<model2>.jsonl"):
        read_judgments(bad)


def test_unknown_layout_names_file_and_line(tmp_path):
    bad = tmp_path / "j.jsonl"
    bad.write_text(json.dumps({"question_id": 1, "something": 2}) + "\n")
    with pytest.raises(RecordError, match="j.jsonl:1: not a judgment record of a known layout"):
        summarize_loaded(read_judgments(bad))


def test_cli_bad_input_is_a_message_naming_the_file_not_a_traceback(tmp_path):
    bad = tmp_path / "j.jsonl"
    bad.write_text('{"question_id": 1, "model": "m", "score": 5}\n{oops\n')
    done = subprocess.run([sys.executable, "-m", "ds_vicuna.eval.cli", "summarize", str(bad)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"error: {bad}:2: not valid JSON" in done.stderr


def test_answer_files_give_lengths_to_judgments_without_them():
    answers = sorted((ASSETS / "fastchat" / "model_answer").glob("*.jsonl"))
    out = json.loads(run_cli(FASTCHAT_PAIR, FASTCHAT_SINGLE, "--json", "--answers", *answers))
    vicuna = out[0]
    # vicuna-13b's answers are "A thorough answer. " x (i + 1 + turn), gpt-3.5-turbo's "Short. " x the same
    assert vicuna["length"]["vicuna-13b"]["n"] == 7 and vicuna["length"]["gpt-3.5-turbo"]["n"] == 7
    assert vicuna["length"]["vicuna-13b"]["mean_chars"] > 2 * vicuna["length"]["gpt-3.5-turbo"]["mean_chars"]
    assert vicuna["lc_preference_2"] is not None and vicuna["ci"]["lc_preference_2"]
    assert out[2]["models"]["vicuna-13b"]["length"]["n"] == 4


def test_the_table_names_the_model_of_each_win_count():
    table = run_cli(LEGACY)
    assert "alpaca-13b wins 1 / ties 1 / vicuna-13b wins 3" in table
