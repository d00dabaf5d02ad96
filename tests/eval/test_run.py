"""`ds-vicuna eval run` end to end against local servers: three model endpoints and a judge (the scripted fake,
each on its own 127.0.0.1 port), FastChat-format questions with reference answers; then a rerun resumes."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from tests.support.fake_openai_judge import start_server

from ds_vicuna.eval.run_settings import parse_endpoint

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "fastchat"
MODELS = ("alpha-q8", "beta-q5", "gamma-q6")


@pytest.fixture(scope="module")
def endpoints():
    servers = [start_server()[0] for _ in range(len(MODELS) + 1)]
    yield [f"http://127.0.0.1:{s.server_address[1]}/v1" for s in servers]
    for server in servers:
        server.shutdown()


def _run(out, endpoints, *extra):
    models = [f"{url}={name}" for url, name in zip(endpoints, MODELS)]
    cmd = [sys.executable, "-m", "ds_vicuna.cli", "eval", "run", "--questions", str(ASSETS / "question.jsonl"),
           "--reference-answers", str(ASSETS / "reference_answer_gpt-4.jsonl"), "--models", *models,
           "--judge", f"{endpoints[-1]}=gpt-4", "--out", str(out), "--quiet", "--bootstrap", "200",
           "--max-attempts", "3", "--backoff", "0.01", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_run_writes_fastchat_layout_summary_ratings_plots_and_report_then_resumes(tmp_path, endpoints):
    out = tmp_path / "run"
    done = _run(out, endpoints, "--reference", "beta-q5")
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(p.name for p in (out / "model_answer").iterdir()) == [f"{m}.jsonl" for m in sorted(MODELS)]
    for model in MODELS:
        records = [json.loads(line) for line in (out / "model_answer" / f"{model}.jsonl").read_text().splitlines()]
        assert len(records) == 5 and all(len(r["choices"][0]["turns"]) == 2 for r in records)
        assert all(r["model_id"] == model for r in records)
    single = (out / "model_judgment" / "gpt-4_single.jsonl").read_text().splitlines()
    pair = [json.loads(line) for line in (out / "model_judgment" / "gpt-4_pair.jsonl").read_text().splitlines()]
    assert len(single) == 3 * 10 and len(pair) == 3 * 10  # 5 questions x 2 turns, per model / per pair
    assert {r["judge"][1] for r in pair} == {"pair-v2", "pair-v2-multi-turn", "pair-math-v1",
                                             "pair-math-v1-multi-turn"}

    summary = json.loads((out / "summary.json").read_text())
    grades = next(s for s in summary if s.get("mode") == "single")["models"]
    assert grades["alpha-q8"]["mean"] > grades["gamma-q6"]["mean"] > grades["beta-q5"]["mean"]
    ratings = json.loads((out / "ratings.json").read_text())
    assert list(ratings["models"]) == ["alpha-q8", "gamma-q6", "beta-q5"] and ratings["battles"] == 30
    relative = json.loads((out / "relative_quality.json").read_text())
    assert relative["reference"] == "beta-q5" and relative["source"] == "single"
    assert relative["models"]["beta-q5"]["relative"] == 100.0 and relative["models"]["alpha-q8"]["relative"] > 140
    pngs = sorted(p.name for p in (out / "plots").iterdir())
    assert pngs == ["category_scores.png", "ratings.png", "relative_quality.png", "win_tie_loss.png"]
    assert all((out / "plots" / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)
    report = (out / "report.md").read_text()
    assert "Every answer and judgment is in." in report
    for heading in ("## Single-answer grades", "## Ratings", "## Relative quality (% of `beta-q5`",
                    "## Pairwise comparisons", "## Judge reliability", "![ratings](plots/ratings.png)"):
        assert heading in report, heading
    assert "| 1 | `alpha-q8` |" in report

    again = _run(out, endpoints, "--reference", "beta-q5")
    assert again.returncode == 0, again.stderr
    assert (out / "model_judgment" / "gpt-4_pair.jsonl").read_text().count("\n") == 30  # nothing judged twice


def test_run_reports_missing_references_and_exits_1_on_failures(tmp_path, endpoints):
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question_id": 1, "category": "math", "turns": ["2+2?"]}) + "\n"
                         + json.dumps({"question_id": 2, "category": "writing", "turns": ["Hi #fake:500x99"]}) + "\n")
    models = [f"{url}={name}" for url, name in zip(endpoints, MODELS[:2])]
    done = subprocess.run([sys.executable, "-m", "ds_vicuna.cli", "eval", "run", "--questions", str(questions),
                           "--models", *models, "--judge", f"{endpoints[-1]}=gpt-4", "--out", str(tmp_path / "run"),
                           "--quiet", "--bootstrap", "50", "--max-attempts", "2", "--backoff", "0.01",
                           "--mode", "single"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "judged WITHOUT a reference answer" in done.stderr
    report = (tmp_path / "run" / "report.md").read_text()
    assert "1 answers of `alpha-q8` failed; rerun the same command" in report


@pytest.mark.parametrize("text,error", [
    ("http://h:1/v1", "expected URL=name"), ("h:1/v1=m", "expected URL=name"), ("http://h/v1=", "expected URL=name"),
])
def test_bad_endpoint_is_named(text, error):
    with pytest.raises(ValueError, match=f"--models {text!r}: {error}".replace("?", r"\?")):
        parse_endpoint(text, "--models")


def test_endpoint_split_at_the_last_equals_sign():
    endpoint = parse_endpoint("http://h:1/v1?key=a=my-model", "--judge")
    assert (endpoint.base_url, endpoint.model) == ("http://h:1/v1?key=a", "my-model")
