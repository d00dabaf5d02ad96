"""`ds-vicuna eval plot`: PNG charts from `eval summarize --json` output (or straight from judgment files).

    ds-vicuna eval summarize judgments/*.jsonl --json > summary.json
    ds-vicuna eval plot summary.json --out-dir plots/

Writes `relative_quality.png` (the Vicuna post's Figure 1: each model's total as a % of the model it was compared
with), `win_tie_loss.png` (Figure 3: stacked wins / ties / losses per pair) and `category_scores.png` (mean
score per question in each category, per pair). Pairwise summaries only; single-grade summaries are skipped.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

PLOT_FILES = ("relative_quality.png", "win_tie_loss.png", "category_scores.png")
COLORS = {"model_2": "#4C72B0", "tie": "#B0B0B0", "model_1": "#DD8452"}


def load_summaries(paths: Sequence[str | Path]) -> list[dict]:
    """Pairwise summaries from summary JSON files (`.json`) and/or judgment files (anything else)."""
    from ds_vicuna.eval.summarize import summarize_files

    summaries: list[dict] = []
    for path in paths:
        if str(path).endswith(".json"):
            loaded = json.loads(Path(path).read_text())
            summaries += loaded if isinstance(loaded, list) else [loaded]
        else:
            summaries += summarize_files([path])
    return [s for s in summaries if s.get("mode") != "single"]


def plot_all(summaries: list[dict], out_dir: str | Path) -> list[Path]:
    """Write the three charts; returns their paths.

    Raises:
        ValueError: no pairwise summaries to draw.
    """
    if not summaries:
        raise ValueError("nothing to plot: no pairwise summaries")
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / name for name in PLOT_FILES]
    for draw, path in zip((plot_relative_quality, plot_win_tie_loss, plot_category_scores), paths):
        fig = draw(summaries)
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
    return paths


def _pair_label(s: dict, summaries: list[dict]) -> str:
    one_reference = len({x["model_1"] for x in summaries}) == 1
    return s["model_2"] if one_reference else f"{s['model_2']}\nvs {s['model_1']}"


def _judges(summaries: list[dict]) -> str:
    judges = sorted({j for s in summaries for j in (s.get("judges") or []) if j})
    return ", ".join(judges) if judges else "LLM judge"


def plot_relative_quality(summaries: list[dict]):
    """Figure 1 style: horizontal bars of model_2's total as a % of model_1's, reference at 100%."""
    import matplotlib.pyplot as plt

    references = list(dict.fromkeys(s["model_1"] for s in summaries))
    labels = [f"{m} (reference)" for m in references] + [_pair_label(s, summaries) for s in summaries]
    values = [100.0] * len(references) + [s.get("relative_score") or 0.0 for s in summaries]
    notes = ["100%"] * len(references) + [_relative_note(s) for s in summaries]
    colors = [COLORS["model_1"]] * len(references) + [COLORS["model_2"]] * len(summaries)
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(labels) + 1.5))
    bars = ax.barh(labels[::-1], values[::-1], color=colors[::-1])
    for bar, note in zip(bars, notes[::-1]):
        ax.text(bar.get_width() + 1, bar.get_y() + bar.get_height() / 2, note, va="center", fontsize=9)
    ax.set_xlim(0, max(values + [100]) * 1.25)
    ax.set_xlabel("total score relative to the reference model (%)")
    ax.set_title(f"Relative response quality assessed by {_judges(summaries)}")
    ax.axvline(100, color="#444", linewidth=0.8, linestyle="--")
    return fig


def _relative_note(s: dict) -> str:
    if s.get("relative_score") is None:
        return f"n/a: no scored questions ({s['unparsed']} judgments unparsed)"
    return f"{s['relative_score']:.0f}%  {s['score_2']:g}/{s['score_1']:g}"


def plot_win_tie_loss(summaries: list[dict]):
    """Figure 3 style: per pair, stacked bars of model_2 wins, ties and model_1 wins."""
    import matplotlib.pyplot as plt

    labels = [_pair_label(s, summaries) for s in summaries]
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(labels) + 1.8))
    left = [0] * len(summaries)
    references = sorted({s["model_1"] for s in summaries})
    reference = references[0] if len(references) == 1 else "reference"
    parts = (("model_2", "wins_2", "model wins"), ("tie", "ties", "tie"), ("model_1", "wins_1", f"{reference} wins"))
    for color_key, key, legend in parts:
        counts = [s[key] for s in summaries]
        bars = ax.barh(labels, counts, left=left, color=COLORS[color_key], label=legend)
        for bar, count in zip(bars, counts):
            if count:
                ax.text(bar.get_x() + bar.get_width() / 2, bar.get_y() + bar.get_height() / 2, str(count),
                        ha="center", va="center", fontsize=9, color="white" if color_key != "tie" else "black")
        left = [a + b for a, b in zip(left, counts)]
    ax.invert_yaxis()
    ax.set_xlabel("questions (a win must hold in every answer order judged)")
    ax.set_title(f"Win / tie / loss assessed by {_judges(summaries)}")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.08), ncol=3, frameon=False)
    return fig


def plot_category_scores(summaries: list[dict]):
    """Mean score per question in each category, model_1 vs model_2, one panel per pair."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(summaries), 1, figsize=(10, 3.2 * len(summaries)), squeeze=False)
    for ax, s in zip(axes[:, 0], summaries):
        cats = list(s.get("categories", {}))
        width = 0.38
        for shift, key, model, color in ((-width / 2, "score_1", s["model_1"], COLORS["model_1"]),
                                         (width / 2, "score_2", s["model_2"], COLORS["model_2"])):
            means = [s["categories"][c][key] / s["categories"][c]["n"] if s["categories"][c]["n"] else 0
                     for c in cats]
            ax.bar([i + shift for i in range(len(cats))], means, width, label=model, color=color)
        ax.set_xticks(range(len(cats)), cats, rotation=20, ha="right")
        ax.set_ylim(0, 10.5)
        ax.set_ylabel("mean score (1-10)")
        ax.set_title(f"{s['model_1']} vs {s['model_2']}: score per category (n={s['n']}, "
                     f"unparsed={s['unparsed']})")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
