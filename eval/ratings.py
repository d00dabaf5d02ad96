"""`ds-vicuna eval rate`: Bradley-Terry ratings (Elo scale) with bootstrap intervals from pairwise judgments.

    ds-vicuna eval rate model_judgment/gpt-4_pair.jsonl [more judgment files] [--json] [--plot ratings.png]

Every pairwise item of every file (any layout `judgments.read_judgments` reads) is one battle: its games
combined as `summarize` combines them (a win needs every answer order; disagreeing orders are a tie; an item
with an unreadable game is left out). The Bradley-Terry fit (statistics.bradley_terry) turns the battles into
one rating per model, centred on 1000; the interval of each rating is the 95% percentile interval over
bootstrap resamples of the questions (the whole question: every turn, pair and order of it). The models must be
connected by comparisons (every pair, or every model against one baseline, both work); otherwise there is no
common scale and `rate` says which groups are apart.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np

from ds_vicuna.eval.judgments import JudgmentFile
from ds_vicuna.eval.statistics import Battles, bradley_terry, interval, resample_counts
from ds_vicuna.eval.summarize import Options, combine


def battles_of(loaded: Sequence[JudgmentFile]) -> list[tuple[object, str, str, float]]:
    """(question_id, model_1, model_2, outcome for model_1: 1 win, 0.5 tie, 0 loss) per combined item."""
    out = []
    for file in loaded:
        for item in file.pairs:
            combined = combine(item)
            if combined is not None:
                out.append((item.question_id, item.model_1, item.model_2, (combined.verdict + 1) / 2))
    return out


def rate(loaded: Sequence[JudgmentFile], options: Options | None = None) -> dict:
    """Ratings with intervals, ranked: {"models": {name: {rating, ci, battles, wins, ties, losses}}, ...}.

    Raises:
        ValueError: no pairwise battles, or models in groups no comparison links.
    """
    options = options or Options()
    battles = battles_of(loaded)
    if not battles:
        raise ValueError("no pairwise judgments with a readable verdict to rate")
    names = sorted({m for _, a, b, _ in battles for m in (a, b)})
    index = {m: i for i, m in enumerate(names)}
    _check_connected(battles, names)
    pairs = sorted({(index[a], index[b]) for _, a, b, _ in battles})
    pair_of = {p: k for k, p in enumerate(pairs)}
    questions = sorted({q for q, *_ in battles}, key=str)
    column = {q: i for i, q in enumerate(questions)}
    # (n_battles, P) one-hot of each battle's pair; outcomes per battle
    onehot = np.zeros((len(battles), len(pairs)))
    onehot[np.arange(len(battles)), [pair_of[(index[a], index[b])] for _, a, b, _ in battles]] = 1.0
    outcome = np.array([o for *_, o in battles])
    first, second = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])

    def fit(weights: np.ndarray) -> np.ndarray:  # weights: (n_battles,)
        return bradley_terry(Battles(first, second, (weights * outcome) @ onehot, weights @ onehot), len(names))

    point = fit(np.ones(len(battles)))
    counts = resample_counts(len(questions), options.resamples, options.seed)[:, [column[q] for q, *_ in battles]]
    boot = np.stack([fit(w) for w in counts])  # (R, M)
    record = _records(battles, names)
    models = {m: {"rating": round(float(point[i]), 1), "ci": interval(boot[:, i], options.level), **record[m]}
              for i, m in enumerate(names)}
    for entry in models.values():
        if entry["ties"] == 0 and 0 in (entry["wins"], entry["losses"]):
            entry["note"] = (f"{'won' if entry['losses'] == 0 else 'lost'} every battle: no finite maximum-likelihood "
                             "rating, the value is held by the prior")
    ranked = dict(sorted(models.items(), key=lambda kv: -kv[1]["rating"]))
    for rank, entry in enumerate(ranked.values(), start=1):
        entry["rank"] = rank
    return {"models": ranked, "battles": len(battles), "questions": len(questions),
            "resamples": options.resamples, "level": options.level, "files": [f.path for f in loaded]}


def _records(battles, names) -> dict[str, dict]:
    out = {m: {"battles": 0, "wins": 0, "ties": 0, "losses": 0} for m in names}
    for _, a, b, o in battles:
        for model, result in ((a, o), (b, 1 - o)):
            out[model]["battles"] += 1
            out[model]["wins" if result == 1 else "losses" if result == 0 else "ties"] += 1
    return out


def _check_connected(battles, names: list[str]) -> None:
    group = {m: m for m in names}

    def root(m):
        while group[m] != m:
            m = group[m]
        return m

    for _, a, b, _ in battles:
        group[root(a)] = root(b)
    parts = defaultdict(list)
    for m in names:
        parts[root(m)].append(m)
    if len(parts) > 1:
        raise ValueError("the comparisons leave the models in separate groups with no common scale: "
                         + " | ".join(", ".join(p) for p in parts.values())
                         + "; judge at least one pair across groups")


def format_ratings(result: dict) -> str:
    lines = [f"Bradley-Terry ratings (Elo scale, mean 1000) from {result['battles']} battles on "
             f"{result['questions']} questions; {int(100 * result['level'])}% intervals from "
             f"{result['resamples']} bootstrap resamples of the questions",
             f"  {'rank':<5}{'model':<30}{'rating':>8}  {'interval':<17}{'W/T/L':>12}"]
    for model, m in result["models"].items():
        ci = f"[{m['ci'][0]:.0f}, {m['ci'][1]:.0f}]" if m["ci"] else "n/a"
        lines.append(f"  {m['rank']:<5}{model:<30}{m['rating']:>8.0f}  {ci:<17}"
                     f"{m['wins']:>4}/{m['ties']}/{m['losses']}" + (f"  ({m['note']})" if "note" in m else ""))
    return "\n".join(lines)


def write_ratings(result: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return path
