"""`ds-vicuna eval plot`: PNG charts from judgment files (or `eval summarize --json` output).

    ds-vicuna eval plot model_judgment/*.jsonl --reference gpt35 --out-dir plots/
    ds-vicuna eval summarize judgments/*.jsonl --json > summary.json && ds-vicuna eval plot summary.json

Charts:
- `relative_quality.png`: the Vicuna post's Figure 1. Every model's quality as a % of one reference model
  (`--reference`, default: the first pair's model_1), with 95% bootstrap intervals; one bar per model, the
  reference once. From single-answer grades when the reference has them, else from pairwise score totals
  chained through common opponents (`summarize.relative_quality`). From summary JSON alone, intervals exist only
  for direct comparisons with the reference.
- `win_tie_loss.png`: the post's Figure 3, one stacked bar per pair (model_2's wins, ties, model_1's wins).
- `category_scores.png`: mean score per category: per pair with score prompts, per model for single grades.
- `ratings.png`: Bradley-Terry ratings with intervals (`eval rate`), when given.
A chart without data (e.g. relative quality from verdict-only judgments and no grades) is skipped with a reason.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

PLOT_FILES = ("relative_quality.png", "win_tie_loss.png", "category_scores.png")
RATINGS_FILE = "ratings.png"
COLORS = {"model_2": "#4C72B0", "tie": "#B0B0B0", "model_1": "#DD8452", "reference": "#8C8C8C"}


def load_inputs(paths: Sequence[str | Path], categories: dict | None = None, stored: bool = False):
    """(summaries, read judgment files) from summary JSON files (`.json`) and judgment files (anything else)."""
    from ds_vicuna.eval.judgments import read_judgments
    from ds_vicuna.eval.summarize import summarize_loaded

    summaries, loaded = [], []
    for path in paths:
        if str(path).endswith(".json"):
            data = json.loads(Path(path).read_text())
            summaries += data if isinstance(data, list) else [data]
        else:
            loaded.append(read_judgments(path, categories, stored=stored))
            summaries += summarize_loaded(loaded[-1], stored)
    return summaries, loaded


def load_summaries(paths: Sequence[str | Path]) -> list[dict]:
    """Pairwise summaries from summary JSON files and/or judgment files."""
    return [s for s in load_inputs(paths)[0] if s.get("mode") != "single"]


def default_reference(summaries: list[dict]) -> str | None:
    pairs = [s for s in summaries if s.get("mode") != "single"]
    if pairs:
        return pairs[0]["model_1"]
    singles = [m for s in summaries if s.get("mode") == "single" for m in s["models"]]
    return singles[0] if singles else None


def relative_view(summaries: list[dict], loaded, reference: str) -> dict:
    """Figure 1 data: from judgment files (joint bootstrap) if any, else from the summaries."""
    from ds_vicuna.eval.summarize import relative_quality

    if loaded:
        return relative_quality(loaded, reference)
    return relative_from_summaries(summaries, reference)


def relative_from_summaries(summaries: list[dict], reference: str) -> dict:
    """Figure 1 data from summary JSON: single-grade means, else scored pair totals chained by least squares;
    intervals only where a summary compares a model with the reference directly.

    Raises:
        ValueError: the reference appears in no usable summary.
    """
    import numpy as np

    from ds_vicuna.eval.statistics import relative_log_quality

    for s in summaries:
        if s.get("mode") == "single" and reference in s["models"] and s["models"][reference]["mean"]:
            ref = s["models"][reference]["mean"]
            return {"reference": reference, "source": "single", "models": {
                m: {"relative": round(100 * v["mean"] / ref, 2) if v["mean"] else None, "ci": None}
                for m, v in s["models"].items()}}
    pairs = [s for s in summaries if s.get("mode") != "single" and s.get("score_1") and s.get("score_2")]
    names = sorted({m for s in pairs for m in (s["model_1"], s["model_2"])})
    if reference not in names:
        raise ValueError(f"reference {reference!r} is in no scored comparison or grade summary (models: {names})")
    index = {m: i for i, m in enumerate(names)}
    first = np.array([index[s["model_1"]] for s in pairs])
    second = np.array([index[s["model_2"]] for s in pairs])
    log_ratio = np.array([[math.log(s["score_2"] / s["score_1"]) for s in pairs]])
    quality = relative_log_quality(first, second, log_ratio, len(names), index[reference])[0]
    models = {m: {"relative": round(float(100 * np.exp(quality[i])), 2) if np.isfinite(quality[i]) else None,
                  "ci": _direct_interval(pairs, reference, m)} for m, i in index.items()}
    return {"reference": reference, "source": "pairwise", "models": models}


def _direct_interval(pairs: list[dict], reference: str, model: str):
    for s in pairs:
        bounds = (s.get("ci") or {}).get("relative_score")
        if not bounds or model == reference:
            continue
        if (s["model_1"], s["model_2"]) == (reference, model):
            return bounds
        if (s["model_1"], s["model_2"]) == (model, reference):
            return [round(1e4 / bounds[1], 4), round(1e4 / bounds[0], 4)]
    return None


def plot_all(summaries: list[dict], out_dir: str | Path, *, loaded=(), reference: str | None = None,
             ratings: dict | None = None) -> tuple[list[Path], list[str]]:
    """Write every chart that has data; returns (paths written, reasons for charts skipped).

    Raises:
        ValueError: nothing at all to plot.
    """
    if not summaries and not ratings:
        raise ValueError("nothing to plot: no summaries or judgments")
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reference = reference or default_reference(summaries)
    pairs = [s for s in summaries if s.get("mode") != "single"]
    jobs, skipped = [], []
    if summaries and reference:
        try:
            jobs.append((PLOT_FILES[0], plot_relative_quality, relative_view(summaries, list(loaded), reference),
                         _judges(summaries)))
        except ValueError as err:
            skipped.append(f"{PLOT_FILES[0]}: {err}")
    if pairs:
        jobs.append((PLOT_FILES[1], plot_win_tie_loss, pairs, _judges(summaries)))
    panels = [s for s in summaries if s.get("mode") == "single" or s.get("score_1") is not None]
    if panels:
        jobs.append((PLOT_FILES[2], plot_category_scores, panels, None))
    else:
        skipped.append(f"{PLOT_FILES[2]}: no scores (verdict-only judgments and no single-answer grades)")
    if ratings:
        jobs.append((RATINGS_FILE, plot_ratings, ratings, _judges(summaries)))
    written = []
    for name, draw, data, judges in jobs:
        fig = draw(data, judges) if judges is not None else draw(data)
        fig.savefig(out_dir / name, dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append(out_dir / name)
    if not written:
        raise ValueError("nothing to plot: " + "; ".join(skipped))
    return written, skipped


def _judges(summaries: list[dict]) -> str:
    judges = sorted({j for s in summaries for j in (s.get("judges") or []) if j})
    return ", ".join(judges) if judges else "an LLM judge"


def plot_relative_quality(view: dict, judges: str = "an LLM judge"):
    """Figure 1: one horizontal bar per model, % of the reference, with interval whiskers."""
    import matplotlib.pyplot as plt

    models = [(m, v) for m, v in view["models"].items() if v["relative"] is not None]
    models.sort(key=lambda mv: mv[1]["relative"])
    labels = [f"{m} (reference)" if m == view["reference"] else m for m, _ in models]
    values = [v["relative"] for _, v in models]
    lower = [max(0.0, v["relative"] - v["ci"][0]) if v["ci"] else 0 for _, v in models]
    upper = [max(0.0, v["ci"][1] - v["relative"]) if v["ci"] else 0 for _, v in models]
    colors = [COLORS["reference"] if m == view["reference"] else COLORS["model_2"] for m, _ in models]
    fig, ax = plt.subplots(figsize=(8, 0.55 * len(models) + 1.6))
    bars = ax.barh(labels, values, color=colors, xerr=[lower, upper], capsize=3,
                   error_kw={"elinewidth": 1, "ecolor": "#222"})
    for bar, (m, v), up in zip(bars, models, upper):
        note = f"{v['relative']:.0f}%"
        if v["ci"] and m != view["reference"]:
            note += f"  [{v['ci'][0]:.0f}, {v['ci'][1]:.0f}]"
        ax.text(bar.get_width() + up + 1, bar.get_y() + bar.get_height() / 2, note, va="center", fontsize=9)
    ax.set_xlim(0, max(v + u for v, u in zip(values, upper)) * 1.3)
    source = "single-answer grades" if view["source"] == "single" else "pairwise score totals"
    ax.set_xlabel(f"quality relative to {view['reference']} (%), from {source}; whiskers: 95% bootstrap interval")
    ax.set_title(f"Relative response quality assessed by {judges}")
    ax.axvline(100, color="#444", linewidth=0.8, linestyle="--")
    return fig


def plot_win_tie_loss(summaries: list[dict], judges: str = "an LLM judge"):
    """Figure 3: per pair, stacked bars of model_2 wins, ties and model_1 wins."""
    import matplotlib.pyplot as plt

    labels = [f"{s['model_2']} vs {s['model_1']}" for s in summaries]
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(labels) + 1.8))
    left = [0] * len(summaries)
    parts = (("model_2", "wins_2", "first-named model wins"), ("tie", "ties", "tie"),
             ("model_1", "wins_1", "second-named model wins"))
    for color_key, key, legend in parts:
        counts = [s[key] for s in summaries]
        bars = ax.barh(labels, counts, left=left, color=COLORS[color_key], label=legend)
        for bar, count in zip(bars, counts):
            if count:
                ax.text(bar.get_x() + bar.get_width() / 2, bar.get_y() + bar.get_height() / 2, str(count),
                        ha="center", va="center", fontsize=9, color="white" if color_key != "tie" else "black")
        left = [a + b for a, b in zip(left, counts)]
    ax.invert_yaxis()
    ax.set_xlabel("question turns (a win must hold in every answer order judged)")
    ax.set_title(f"Win / tie / loss assessed by {judges}")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.08), ncol=3, frameon=False)
    return fig


def plot_category_scores(panels: list[dict]):
    """Mean score per category: model_1 vs model_2 per scored pair; every model per single-grade file."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 3.2 * len(panels)), squeeze=False)
    palette = plt.get_cmap("tab10")
    for ax, s in zip(axes[:, 0], panels):
        if s.get("mode") == "single":
            series = {m: v["categories"] for m, v in s["models"].items()}
            title = f"{Path(s['file']).name}: single-answer grade per category"
        else:
            series = {s[f"model_{k}"]: {c: t[f"score_{k}"] / t["n"] for c, t in s["categories"].items()
                                       if t["n"] and t[f"score_{k}"] is not None} for k in (1, 2)}
            title = f"{s['model_1']} vs {s['model_2']}: mean pairwise score per category (n={s['n']})"
        cats = sorted({c for values in series.values() for c in values})
        width = 0.8 / max(1, len(series))
        for k, (model, values) in enumerate(series.items()):
            xs = [i - 0.4 + width * (k + 0.5) for i in range(len(cats))]
            ax.bar(xs, [values.get(c, 0) for c in cats], width, label=model, color=palette(k % 10))
        ax.set_xticks(range(len(cats)), cats, rotation=20, ha="right")
        ax.set_ylim(0, 10.5)
        ax.set_ylabel("mean score (1-10)")
        ax.set_title(title)
        ax.legend(fontsize=8, ncol=min(4, len(series)))
    fig.tight_layout()
    return fig


def plot_ratings(result: dict, judges: str = "an LLM judge"):
    """Bradley-Terry ratings, best first, with 95% interval whiskers."""
    import matplotlib.pyplot as plt

    models = list(result["models"].items())[::-1]
    values = [m["rating"] for _, m in models]
    # a point estimate can sit just outside its percentile interval (a model that wins every battle): no whisker
    lower = [max(0.0, m["rating"] - m["ci"][0]) if m["ci"] else 0 for _, m in models]
    upper = [max(0.0, m["ci"][1] - m["rating"]) if m["ci"] else 0 for _, m in models]
    fig, ax = plt.subplots(figsize=(8, 0.55 * len(models) + 1.6))
    ax.errorbar(values, range(len(models)), xerr=[lower, upper], fmt="o", color=COLORS["model_2"], capsize=4)
    for y, (_name, m) in enumerate(models):
        ci = f" [{m['ci'][0]:.0f}, {m['ci'][1]:.0f}]" if m["ci"] else ""
        ax.annotate(f"{m['rating']:.0f}{ci}", (m["rating"], y), textcoords="offset points", xytext=(0, 8),
                    ha="center", fontsize=8)
    ax.set_yticks(range(len(models)), [name for name, _ in models])
    ax.set_ylim(-0.7, len(models) - 0.3)
    ax.axvline(1000, color="#444", linewidth=0.8, linestyle="--")
    ax.set_xlabel(f"Bradley-Terry rating (Elo scale, mean 1000); whiskers: {int(100 * result['level'])}% "
                  f"bootstrap interval over {result['questions']} questions")
    ax.set_title(f"Ratings from {result['battles']} pairwise battles judged by {judges}")
    return fig
