"""`eval summarize` on a FastChat legacy review file and on our own judgment file: exact --json output."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ds_vicuna.eval.records import RecordError
from ds_vicuna.eval.summarize import summarize_file

ASSETS = Path(__file__).parent / "assets"
LEGACY = ASSETS / "review_alpaca-13b_vicuna-13b.jsonl"
OURS = ASSETS / "judgments_gpt-x_ours.jsonl"
CONTRACT = ["model_1", "model_2", "n", "score_1", "score_2", "wins_1", "ties", "wins_2", "unparsed"]


def run_cli(*args):
    done = subprocess.run([sys.executable, "-m", "ds_vicuna.eval.cli", "summarize", *map(str, args)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_json_output_one_object_per_file_in_input_order():
    out = json.loads(run_cli(LEGACY, OURS, "--json"))
    assert [list(o)[:9] for o in out] == [CONTRACT, CONTRACT]
    # Legacy: scores re-read from `text`; stored "score" is ignored (q4 stored -1 but its text has
    # "Assistant 1: 3 / Assistant 2: 10"; q6 stored [1, 1] but its text says 6.5 8.5); q5 is unparseable.
    assert {k: out[0][k] for k in CONTRACT} == {
        "model_1": "alpaca-13b", "model_2": "vicuna-13b", "n": 5, "score_1": 33.5, "score_2": 41.5,
        "wins_1": 1, "ties": 1, "wins_2": 3, "unparsed": 1}
    # Ours: q1 both orders agree (means 8.5 / 6.5), q2 orders disagree -> tie 7.5 / 7.5, q3 one order
    # unparsed -> left out of totals entirely.
    assert {k: out[1][k] for k in CONTRACT} == {
        "model_1": "gpt-x", "model_2": "ours", "n": 2, "score_1": 16.0, "score_2": 14.0,
        "wins_1": 1, "ties": 1, "wins_2": 0, "unparsed": 1}
    assert out[0] == {
        **{k: out[0][k] for k in CONTRACT}, "relative_score": 123.88, "win_rate_1": 0.2, "tie_rate": 0.2,
        "win_rate_2": 0.6, "inconsistent": 0, "excluded": 1, "file": str(LEGACY), "source": "fastchat-legacy",
        "judges": ["gpt-4-0328-default", "gpt-4-0328-coding", "gpt-4-0328-math"],
        "categories": {"unknown": {"n": 5, "score_1": 33.5, "score_2": 41.5, "wins_1": 1, "ties": 1, "wins_2": 3,
                                   "relative_score": 123.88, "win_rate_1": 0.2, "tie_rate": 0.2,
                                   "win_rate_2": 0.6, "inconsistent": 0}}}
    assert (out[1]["inconsistent"], out[1]["excluded"], out[1]["relative_score"]) == (1, 1, 87.5)
    assert out[1]["categories"]["generic"]["score_1"] == 8.5


def test_reversed_input_order_reverses_output():
    out = json.loads(run_cli(OURS, LEGACY, "--json"))
    assert [o["model_1"] for o in out] == ["gpt-x", "alpaca-13b"]


def test_legacy_categories_from_question_file():
    out = json.loads(run_cli(LEGACY, "--json", "--questions", "vicuna_80"))
    assert set(out[0]["categories"]) == {"generic"}  # ids 1-6 are generic in vicuna_80


def test_table_output_names_the_pair_and_counts():
    text = run_cli(LEGACY)
    assert "alpaca-13b vs vicuna-13b: n=5  total 33.5 / 41.5  relative 123.9%" in text
    assert "unparsed 1" in text


def test_legacy_name_without_two_models_is_rejected(tmp_path):
    bad = tmp_path / "review_a_b_c.jsonl"
    bad.write_text(LEGACY.read_text())
    with pytest.raises(RecordError, match="review_<model1>_<model2>.jsonl"):
        summarize_file(bad)
