"""`eval plot`: the three PNGs are written, valid and non-trivial, from summary JSON or judgment files."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ds_vicuna.eval.plot import PLOT_FILES, load_summaries, plot_all

ASSETS = Path(__file__).parent / "assets"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _check_pngs(paths):
    import matplotlib.image

    assert [p.name for p in paths] == list(PLOT_FILES)
    for path in paths:
        assert path.read_bytes()[:8] == PNG_MAGIC
        pixels = matplotlib.image.imread(path)  # decodes the whole file
        assert pixels.shape[0] > 200 and pixels.shape[1] > 400
        assert pixels.std() > 0.05  # something was drawn


def test_plot_from_summary_json_via_cli(tmp_path):
    summary = subprocess.run([sys.executable, "-m", "ds_vicuna.eval.cli", "summarize", "--json",
                              str(ASSETS / "review_alpaca-13b_vicuna-13b.jsonl"),
                              str(ASSETS / "judgments_gpt-x_ours.jsonl")],
                             capture_output=True, text=True, timeout=60, check=True).stdout
    (tmp_path / "summary.json").write_text(summary)
    done = subprocess.run([sys.executable, "-m", "ds_vicuna.eval.cli", "plot", str(tmp_path / "summary.json"),
                           "--out-dir", str(tmp_path / "plots")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    _check_pngs([Path(line) for line in done.stdout.split()])


def test_plot_straight_from_judgment_files(tmp_path):
    summaries = load_summaries([ASSETS / "judgments_gpt-x_ours.jsonl"])
    assert summaries[0]["model_2"] == "ours"
    _check_pngs(plot_all(summaries, tmp_path))


def test_nothing_to_plot_is_an_error(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps([]))
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_all(load_summaries([tmp_path / "s.json"]), tmp_path)
