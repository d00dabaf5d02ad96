"""`eval plot` and `eval rate --plot`: PNGs written, valid and non-trivial; Figure 1 has one bar per model."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ds_vicuna.eval.plot import PLOT_FILES, RATINGS_FILE, load_inputs, plot_all, relative_from_summaries

ASSETS = Path(__file__).resolve().parents[1] / "assets"
LEGACY = ASSETS / "review_alpaca-13b_vicuna-13b.jsonl"
FASTCHAT = ASSETS / "fastchat" / "model_judgment"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _check_png(path):
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_MAGIC
    pixels = matplotlib.image.imread(path)  # decodes the whole file
    assert pixels.shape[0] > 200 and pixels.shape[1] > 400
    assert pixels.std() > 0.05  # something was drawn


def _cli(*args):
    done = subprocess.run([sys.executable, "-m", "ds_vicuna.eval.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done


def test_plot_from_summary_json_via_cli(tmp_path):
    summary = _cli("summarize", "--json", LEGACY, ASSETS / "judgments_gpt-x_ours.jsonl").stdout
    (tmp_path / "summary.json").write_text(summary)
    done = _cli("plot", tmp_path / "summary.json", "--out-dir", tmp_path / "plots")
    paths = [Path(line) for line in done.stdout.split()]
    assert [p.name for p in paths] == list(PLOT_FILES)
    for path in paths:
        _check_png(path)


def test_plot_from_judgment_files_with_reference_and_ratings(tmp_path):
    done = _cli("plot", FASTCHAT / "gpt-4_pair.jsonl", FASTCHAT / "gpt-4_single.jsonl", "--reference",
                "gpt-3.5-turbo", "--ratings", "--out-dir", tmp_path)
    paths = [Path(line) for line in done.stdout.split()]
    assert [p.name for p in paths] == [*PLOT_FILES, RATINGS_FILE]
    for path in paths:
        _check_png(path)


def test_figure_1_view_one_bar_per_model_with_intervals(tmp_path):
    # three files comparing against one hub; reference = one of the spokes
    for model, mine in (("a", 5), ("b", 8), ("c", 9)):
        (tmp_path / f"review_{model}_hub.jsonl").write_text("".join(
            json.dumps({"review_id": f"{model}{q}", "question_id": q, "text": f"{mine + q % 2} 10\nok",
                        "score": [mine + q % 2, 10]}) + "\n" for q in range(1, 21)))
    files = sorted(tmp_path.glob("review_*.jsonl"))
    summaries, loaded = load_inputs(files)
    from ds_vicuna.eval.plot import relative_view

    view = relative_view(summaries, loaded, "b")
    assert sorted(view["models"]) == ["a", "b", "c", "hub"]  # each model once: no redundant 100% bars
    assert view["models"]["b"]["relative"] == 100.0
    assert view["models"]["a"]["relative"] == round(100 * 110 / 170, 2)  # a=5.5 avg, b=8.5 avg, via the hub
    assert all(v["ci"] for v in view["models"].values())
    # from summary JSON alone: the same point values, intervals only where a comparison is direct
    plain = relative_from_summaries(summaries, "hub")
    assert plain["models"]["a"]["relative"] == round(100 * 110 / 200, 2) and plain["models"]["a"]["ci"]
    written, skipped = plot_all(summaries, tmp_path / "plots", loaded=loaded, reference="b")
    assert not skipped
    _check_png(written[0])


def test_verdict_only_judgments_skip_score_charts_with_a_reason(tmp_path):
    summaries, loaded = load_inputs([FASTCHAT / "gpt-4_pair.jsonl"])
    written, skipped = plot_all(summaries, tmp_path, loaded=loaded)
    assert [p.name for p in written] == ["win_tie_loss.png"]
    assert any("no scores" in s for s in skipped) and any("relative_quality.png" in s for s in skipped)


def test_rate_cli_prints_ranks_and_writes_a_png(tmp_path):
    done = _cli("rate", FASTCHAT / "gpt-4_pair.jsonl", "--json", "--bootstrap", "100", "--plot",
                tmp_path / "ratings.png")
    result = json.loads(done.stdout)
    assert list(result["models"]) == ["gpt-3.5-turbo", "vicuna-13b", "llama-13b"]
    assert all(m["ci"][0] <= m["rating"] <= m["ci"][1] for m in result["models"].values())
    _check_png(tmp_path / "ratings.png")
    table = _cli("rate", FASTCHAT / "gpt-4_pair.jsonl", "--bootstrap", "50").stdout
    # question 133 has an "error" game
    assert "Bradley-Terry ratings (Elo scale, mean 1000) from 8 battles on 4 questions" in table


def test_nothing_to_plot_is_an_error(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps([]))
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_all(load_inputs([tmp_path / "s.json"])[0], tmp_path)
