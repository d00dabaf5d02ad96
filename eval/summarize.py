"""`ds-vicuna eval summarize`: totals, win rates and their 95% intervals, position consistency, answer lengths.

    ds-vicuna eval summarize model_judgment/gpt-4_pair.jsonl review_gpt35_vicuna-13b.jsonl [--json]
    ds-vicuna eval summarize review_bard_vicuna-13b.jsonl --stored-scores    # the published Table 2 figures

Inputs: any judgment layout `judgments.read_judgments` reads (ours, FastChat's `model_judgment` files, the
Vicuna post's review files). Output (`--json`): a list, per input file in order, of one object per model pair
in the file (pairwise) and one object for its single-answer grades, if any.

How a pairwise item (one question turn of one pair) is combined:
- its games are the answer orders judged (two with swapping; one for `--no-swap` runs and review files);
- if any game has no readable verdict, the item is left out of totals and wins (`excluded`), and each such game
  is counted in `unparsed` (using the other order alone would bring back the position bias swapping removes);
- a win needs consistency: model 1 wins only if it won EVERY game, model 2 likewise; anything else (a tie in
  some game, or games that disagree) is a tie, as FastChat's `show_result.py` counts it. Disagreeing games are
  also counted in `inconsistent`;
- with score prompts, each model's item score is its mean over the games; `score_1`/`score_2` sum those and
  `relative_score` = 100 * score_2 / score_1 (Vicuna's "relative response quality" of model 2 to model 1).
  Verdict prompts (MT-bench's `[[A]]`) have no scores: those fields are null.

Beside them: `ci` (bootstrap 95% intervals, questions resampled), `consistency` (share of items whose two
games agree, and whom the disagreements favoured), `length` (characters of each model's judged answers) and
`lc_preference_2` (the length-controlled preference for model 2, next to the raw `preference_2` = win rate
with ties counted half). `mismatches` lists records whose stored score or verdict disagrees with the judge's
text, whichever of the two is used (`--stored-scores`).
"""
from __future__ import annotations

import json
import statistics as pystats
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ds_vicuna.eval.judgments import FIRST, SECOND, JudgmentFile, PairItem, SingleItem, read_many
from ds_vicuna.eval.statistics import (DEFAULT_LEVEL, DEFAULT_RESAMPLES, cluster_weights, interval,
                                       length_controlled_preference, relative_log_quality, resample_counts,
                                       weighted_ratio)

MIN_LC_ITEMS = 5  # fewer items with known lengths: no length-controlled value


@dataclass(frozen=True)
class Combined:
    """One pairwise item after combining its games."""

    question_id: object
    category: str
    verdict: int
    """+1 model 1 won every game, -1 model 2 did, 0 tie."""
    inconsistent: bool
    score_1: float | None
    score_2: float | None
    lengths: tuple[int, int] | None


@dataclass
class Tally:
    """Totals over a set of combined items."""

    n: int = 0
    scored: int = 0
    score_1: float = 0.0
    score_2: float = 0.0
    wins_1: int = 0
    ties: int = 0
    wins_2: int = 0
    inconsistent: int = 0

    def add(self, item: Combined) -> None:
        self.n += 1
        if item.score_1 is not None:
            self.scored += 1
            self.score_1 += item.score_1
            self.score_2 += item.score_2
        self.wins_1 += item.verdict > 0
        self.wins_2 += item.verdict < 0
        self.ties += item.verdict == 0
        self.inconsistent += item.inconsistent

    def as_dict(self) -> dict:
        rate = (lambda k: round(k / self.n, 4)) if self.n else (lambda k: None)
        scored = self.scored > 0
        return {"n": self.n, "score_1": round(self.score_1, 4) if scored else None,
                "score_2": round(self.score_2, 4) if scored else None,
                "wins_1": self.wins_1, "ties": self.ties, "wins_2": self.wins_2,
                "relative_score": round(100 * self.score_2 / self.score_1, 2) if scored and self.score_1 else None,
                "win_rate_1": rate(self.wins_1), "tie_rate": rate(self.ties), "win_rate_2": rate(self.wins_2),
                "inconsistent": self.inconsistent}


def combine(item: PairItem) -> Combined | None:
    """The item's verdict and mean scores over its games; None when some game has no verdict."""
    if not item.games or any(g.winner is None for g in item.games):
        return None
    signs = [1 if g.winner == FIRST else -1 if g.winner == SECOND else 0 for g in item.games]
    verdict = 1 if all(s > 0 for s in signs) else -1 if all(s < 0 for s in signs) else 0
    scored = all(g.score_1 is not None for g in item.games)
    mean = (lambda key: sum(getattr(g, key) for g in item.games) / len(item.games)) if scored else None
    return Combined(item.question_id, item.category, verdict, len(set(signs)) > 1,
                    mean("score_1") if scored else None, mean("score_2") if scored else None, item.lengths)


@dataclass
class Options:
    resamples: int = DEFAULT_RESAMPLES
    seed: int = 0
    level: float = DEFAULT_LEVEL


def summarize_pair(items: list[PairItem], loaded: JudgmentFile, stored: bool, options: Options) -> dict:
    """The summary object of one model pair (module docstring)."""
    model_1, model_2 = items[0].model_1, items[0].model_2
    combined = [c for c in map(combine, items) if c is not None]
    total, categories = Tally(), {}
    for c in combined:
        total.add(c)
        categories.setdefault(c.category, Tally()).add(c)
    counts = total.as_dict()
    out = {"model_1": model_1, "model_2": model_2, **{k: counts[k] for k in (
        "n", "score_1", "score_2", "wins_1", "ties", "wins_2")},
        "unparsed": sum(g.winner is None for item in items for g in item.games)}
    out.update({k: counts[k] for k in ("relative_score", "win_rate_1", "tie_rate", "win_rate_2", "inconsistent")})
    out.update(excluded=len(items) - len(combined), file=loaded.path, source="+".join(loaded.sources),
               judges=loaded.judges, scored=total.scored,
               mean_1=round(total.score_1 / total.scored, 4) if total.scored else None,
               mean_2=round(total.score_2 / total.scored, 4) if total.scored else None,
               preference_2=round((total.wins_2 + 0.5 * total.ties) / total.n, 4) if total.n else None)
    out["lc_preference_2"], lc_samples = _length_controlled(combined, options)
    out["ci"] = _pair_intervals(combined, lc_samples, options)
    out["consistency"] = _consistency(items)
    out["length"] = _length_stats(items, model_1, model_2)
    out["stored_scores"] = stored
    out["mismatches"] = [m.as_dict() for m in loaded.mismatches if m.models == (model_1, model_2)]
    out["categories"] = {c: t.as_dict() for c, t in sorted(categories.items())}
    return out


def _vectors(combined: list[Combined]) -> dict[str, np.ndarray]:
    scored = np.array([c.score_1 is not None for c in combined], dtype=float)
    return {"scored": scored,
            "score_1": np.array([c.score_1 or 0.0 for c in combined]),
            "score_2": np.array([c.score_2 or 0.0 for c in combined]),
            "wins_1": np.array([c.verdict > 0 for c in combined], dtype=float),
            "ties": np.array([c.verdict == 0 for c in combined], dtype=float),
            "wins_2": np.array([c.verdict < 0 for c in combined], dtype=float),
            "one": np.ones(len(combined))}


def _pair_intervals(combined: list[Combined], lc_samples, options: Options) -> dict:
    if not combined:
        return {}
    v = _vectors(combined)
    w = cluster_weights([c.question_id for c in combined], options.resamples, options.seed)
    samples = {"score_1": w @ v["score_1"], "score_2": w @ v["score_2"],
               "mean_1": weighted_ratio(w, v["score_1"], v["scored"]),
               "mean_2": weighted_ratio(w, v["score_2"], v["scored"]),
               "relative_score": 100 * weighted_ratio(w, v["score_2"], v["score_1"]),
               "win_rate_1": weighted_ratio(w, v["wins_1"], v["one"]),
               "tie_rate": weighted_ratio(w, v["ties"], v["one"]),
               "win_rate_2": weighted_ratio(w, v["wins_2"], v["one"]),
               "preference_2": weighted_ratio(w, v["wins_2"] + 0.5 * v["ties"], v["one"])}
    if not v["scored"].any():
        for key in ("score_1", "score_2", "mean_1", "mean_2", "relative_score"):
            samples.pop(key)
    if lc_samples is not None:
        samples["lc_preference_2"] = lc_samples
    return {k: interval(s, options.level) for k, s in samples.items()}


def _length_controlled(combined: list[Combined], options: Options):
    """(value, bootstrap samples) of the length-controlled preference for model 2, or (None, None)."""
    known = [c for c in combined if c.lengths is not None]
    if len(known) < MIN_LC_ITEMS:
        return None, None
    preference = np.array([1.0 if c.verdict < 0 else 0.5 if c.verdict == 0 else 0.0 for c in known])
    diff = np.array([c.lengths[1] - c.lengths[0] for c in known], dtype=float)
    questions = [c.question_id for c in known]
    value = float(length_controlled_preference(preference, diff, groups=questions)[0])
    weights = cluster_weights(questions, options.resamples, options.seed)
    return round(value, 4), length_controlled_preference(preference, diff, weights, groups=questions)


def _consistency(items: list[PairItem]) -> dict:
    """How often the two answer orders agree, and whom the disagreements favoured."""
    both = [i for i in items if len(i.games) == 2 and all(g.winner is not None for g in i.games)]
    agree = sum(i.games[0].winner == i.games[1].winner for i in both)
    first = second = 0
    for item in both:
        winners = [g.winner for g in item.games]
        if winners[0] == winners[1]:
            continue
        first += all(w == g.shown_first for w, g in zip(winners, item.games))
        second += all(w not in ("tie", g.shown_first) for w, g in zip(winners, item.games))
    return {"judged_both_orders": len(both), "consistent": agree,
            "rate": round(agree / len(both), 4) if both else None,
            "inconsistent_favoring_first_shown": first, "inconsistent_favoring_second_shown": second,
            "inconsistent_with_a_tie": len(both) - agree - first - second}


def _length_stats(items: list[PairItem], model_1: str, model_2: str) -> dict | None:
    known = [i.lengths for i in items if i.lengths is not None]
    if not known:
        return None
    return {model: _describe([lengths[k] for lengths in known]) for k, model in enumerate((model_1, model_2))}


def _describe(values: list[float]) -> dict:
    return {"n": len(values), "mean_chars": round(pystats.fmean(values), 1),
            "median_chars": round(pystats.median(values), 1)}


def summarize_singles(items: list[SingleItem], loaded: JudgmentFile, stored: bool, options: Options) -> dict:
    """Per-model single-answer grades: mean (with interval), per turn and per category, lengths, unparsed."""
    per_model: dict[str, list[SingleItem]] = defaultdict(list)
    for item in items:
        per_model[item.model].append(item)
    models = {}
    for model, graded_and_not in per_model.items():
        graded = [i for i in graded_and_not if i.score is not None]
        scores = np.array([i.score for i in graded])
        entry = {"n": len(graded), "total": round(float(scores.sum()), 4),
                 "mean": round(float(scores.mean()), 4) if graded else None,
                 "unparsed": len(graded_and_not) - len(graded), "ci": {}}
        if graded:
            w = cluster_weights([i.question_id for i in graded], options.resamples, options.seed)
            entry["ci"]["mean"] = interval(w @ scores / w.sum(1), options.level)
        entry["turns"] = _means(graded, lambda i: str(i.turn))
        entry["categories"] = _means(graded, lambda i: i.category)
        lengths = [i.length for i in graded_and_not if i.length is not None]
        entry["length"] = _describe(lengths) if lengths else None
        models[model] = entry
    return {"file": loaded.path, "mode": "single", "source": "+".join(loaded.sources), "judges": loaded.judges,
            "stored_scores": stored, "mismatches": [m.as_dict() for m in loaded.mismatches if len(m.models) == 1],
            "models": models}


def _means(items: list[SingleItem], key) -> dict:
    groups: dict[str, list[float]] = defaultdict(list)
    for item in items:
        groups[key(item)].append(item.score)
    return {k: round(sum(v) / len(v), 4) for k, v in sorted(groups.items())}


def summarize_loaded(loaded: JudgmentFile, stored: bool = False, options: Options | None = None) -> list[dict]:
    """The summary objects of one read file: one per model pair (first-appearance order), then its grades."""
    options = options or Options()
    pairs: dict[tuple, list[PairItem]] = {}
    for item in loaded.pairs:
        pairs.setdefault((item.model_1, item.model_2), []).append(item)
    out = [summarize_pair(items, loaded, stored, options) for items in pairs.values()]
    if loaded.singles:
        out.append(summarize_singles(loaded.singles, loaded, stored, options))
    return out


def summarize_files(paths: Sequence[str | Path], categories: dict | None = None, *, stored: bool = False,
                    options: Options | None = None, prompt_sets=()) -> list[dict]:
    """Summary objects for each file, in input order (the `--json` output)."""
    return [summary for loaded in read_many(paths, categories, stored=stored, prompt_sets=prompt_sets)
            for summary in summarize_loaded(loaded, stored, options)]


def relative_quality(loaded: Sequence[JudgmentFile], reference: str, source: str = "auto",
                     options: Options | None = None) -> dict:
    """Every model's quality as a % of `reference` (the Vicuna post's Figure 1), with bootstrap intervals.

    Args:
        loaded: read judgment files.
        reference: the model at 100%.
        source: "single" (mean single-answer grade over the question turns both models were graded on),
            "pairwise" (score totals of pairwise comparisons, chained through common opponents by least squares
            on log ratios: for a star of comparisons this is the product of the ratios along the path, as the
            post computed it), or "auto" (single when the reference has single grades).

    Raises:
        ValueError: the reference has no judgments of the chosen source.
    """
    options = options or Options()
    singles = [i for f in loaded for i in f.singles if i.score is not None]
    if source == "auto":
        source = "single" if any(i.model == reference for i in singles) else "pairwise"
    if source == "single":
        return _relative_from_singles(singles, reference, options)
    return _relative_from_pairs([i for f in loaded for i in f.pairs], reference, options)


def _relative_from_singles(singles: list[SingleItem], reference: str, options: Options) -> dict:
    grades: dict[str, dict[tuple, float]] = defaultdict(dict)
    for item in singles:
        grades[item.model].setdefault((item.question_id, item.turn), item.score)
    if reference not in grades:
        raise ValueError(f"reference {reference!r} has no single-answer grades (models: {sorted(grades)})")
    questions = sorted({key[0] for g in grades.values() for key in g}, key=str)
    counts = resample_counts(len(questions), options.resamples, options.seed)
    column = {q: i for i, q in enumerate(questions)}
    models = {}
    for model, own in grades.items():
        common = [key for key in own if key in grades[reference]]
        mine = np.array([own[k] for k in common])
        theirs = np.array([grades[reference][k] for k in common])
        w = counts[:, [column[k[0]] for k in common]]
        value = 100 * mine.sum() / theirs.sum() if common and theirs.sum() else None
        models[model] = {"relative": round(float(value), 2) if value is not None else None,
                         "ci": interval(100 * weighted_ratio(w, mine, theirs), options.level) if common else None,
                         "items": len(common)}
    return {"reference": reference, "source": "single", "models": _ranked(models)}


def _relative_from_pairs(pairs: list[PairItem], reference: str, options: Options) -> dict:
    comparisons: dict[tuple, list[Combined]] = defaultdict(list)
    for item in pairs:
        c = combine(item)
        if c is not None and c.score_1 is not None:
            comparisons[(item.model_1, item.model_2)].append(c)
    names = sorted({m for pair in comparisons for m in pair})
    if reference not in names:
        raise ValueError(f"reference {reference!r} is in no scored pairwise comparison (models: {names}); "
                         "verdict-only judgments (MT-bench [[A]]) have no totals: use single-answer grades")
    index = {m: i for i, m in enumerate(names)}
    questions = sorted({c.question_id for items in comparisons.values() for c in items}, key=str)
    column = {q: i for i, q in enumerate(questions)}
    counts = resample_counts(len(questions), options.resamples, options.seed)
    first = np.array([index[a] for a, _ in comparisons])
    second = np.array([index[b] for _, b in comparisons])
    observed, sampled = [], []
    for items in comparisons.values():
        s1, s2 = np.array([c.score_1 for c in items]), np.array([c.score_2 for c in items])
        w = counts[:, [column[c.question_id] for c in items]]
        observed.append(_log_ratio(s2.sum(), s1.sum()))
        sampled.append(_log_ratio(w @ s2, w @ s1))
    point = relative_log_quality(first, second, np.array([observed]), len(names), index[reference])[0]
    boot = relative_log_quality(first, second, np.stack(sampled, axis=1), len(names), index[reference])
    models = {}
    for m, i in index.items():
        connected = np.isfinite(point[i])
        models[m] = {"relative": round(float(100 * np.exp(point[i])), 2) if connected else None,
                     "ci": interval(100 * np.exp(boot[:, i]), options.level) if connected else None}
    return {"reference": reference, "source": "pairwise",
            "comparisons": [list(pair) for pair in comparisons], "models": _ranked(models)}


def _log_ratio(top, bottom):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((np.asarray(top) > 0) & (np.asarray(bottom) > 0), np.log(top) - np.log(bottom), np.nan)


def _ranked(models: dict) -> dict:
    return dict(sorted(models.items(), key=lambda kv: -(kv[1]["relative"] or -1)))


def format_table(summaries: list[dict]) -> str:
    """Plain-text report: a Table-2-style block per pair, a block per single-grade file."""
    lines = []
    for s in summaries:
        if s.get("mode") == "single":
            lines += _single_lines(s)
        elif s.get("mode") != "relative_quality":
            lines += _pair_lines(s)
        lines += _mismatch_lines(s)
    return "\n".join(lines)


def _fmt_ci(ci: dict, key: str, scale: float = 1.0, digits: int = 1) -> str:
    bounds = ci.get(key)
    return f" [{bounds[0] * scale:.{digits}f}, {bounds[1] * scale:.{digits}f}]" if bounds else ""


def _pair_lines(s: dict) -> list[str]:
    ci = s.get("ci", {})
    head = f"{s['file']}\n  {s['model_1']} vs {s['model_2']}: n={s['n']}"
    if s["score_1"] is not None:
        rel = f"{s['relative_score']:.1f}%" if s["relative_score"] is not None else "n/a"
        head += (f"  total {s['score_1']:g} / {s['score_2']:g}  relative {rel}{_fmt_ci(ci, 'relative_score')}")
    head += (f"  {s['model_1']} wins {s['wins_1']} / ties {s['ties']} / {s['model_2']} wins {s['wins_2']}  "
             f"unparsed {s['unparsed']} "
             f"(items excluded {s['excluded']}, inconsistent orders {s['inconsistent']})")
    lines = [head]
    if s["n"]:
        lines.append(f"    win rate {s['model_2']} {100 * s['win_rate_2']:.1f}%{_fmt_ci(ci, 'win_rate_2', 100)}  "
                     f"{s['model_1']} {100 * s['win_rate_1']:.1f}%{_fmt_ci(ci, 'win_rate_1', 100)}  "
                     f"tie {100 * s['tie_rate']:.1f}%")
        lc = (f"{100 * s['lc_preference_2']:.1f}%{_fmt_ci(ci, 'lc_preference_2', 100)}"
              if s.get("lc_preference_2") is not None else "n/a (no answer lengths)")
        lines.append(f"    preference for {s['model_2']} (ties half): raw {100 * s['preference_2']:.1f}%"
                     f"{_fmt_ci(ci, 'preference_2', 100)}  length-controlled {lc}")
    cons = s.get("consistency") or {}
    if cons.get("judged_both_orders"):
        lines.append(f"    position consistency {100 * cons['rate']:.1f}% of {cons['judged_both_orders']} items "
                     f"judged in both orders; disagreements favoured the first-shown answer "
                     f"{cons['inconsistent_favoring_first_shown']}x, the second "
                     f"{cons['inconsistent_favoring_second_shown']}x, with a tie "
                     f"{cons['inconsistent_with_a_tie']}x")
    if s.get("length"):
        lines.append("    answer length (chars, mean/median): " + ", ".join(
            f"{m} {d['mean_chars']:g}/{d['median_chars']:g}" for m, d in s["length"].items()))
    for cat, c in s["categories"].items():
        scores = f" {c['score_1']:g} / {c['score_2']:g}" if c["score_1"] is not None else ""
        lines.append(f"    {cat:<16} n={c['n']:<3}{scores}  W/T/L {c['wins_1']}/{c['ties']}/{c['wins_2']}")
    return lines


def _single_lines(s: dict) -> list[str]:
    lines = [f"{s['file']} (single-answer grades)"]
    for model, m in sorted(s["models"].items(), key=lambda kv: -(kv[1]["mean"] or 0)):
        turns = "  ".join(f"turn {t}: {v:.2f}" for t, v in m["turns"].items())
        mean = f"{m['mean']:.2f}{_fmt_ci(m['ci'], 'mean', 1, 2)}" if m["mean"] is not None else "n/a"
        lines.append(f"  {model:<28} n={m['n']:<4} mean={mean}  {turns}  unparsed={m['unparsed']}")
    return lines


def _mismatch_lines(s: dict) -> list[str]:
    found = s.get("mismatches") or []
    if not found:
        return []
    used = "stored values used (--stored-scores)" if s.get("stored_scores") else "the judge's text used"
    lines = [f"    {len(found)} record(s) whose stored score disagrees with the judge's text ({used}):"]
    for m in found[:10]:
        lines.append(f"      line {m['line']}: question {m['question_id']} turn {m['turn']}: stored "
                     f"{json.dumps(m['stored'])}, text {json.dumps(m['text'])}")
    if len(found) > 10:
        lines.append(f"      ... {len(found) - 10} more (see --json)")
    return lines


def dumps(summaries: list[dict]) -> str:
    return json.dumps(summaries, indent=2)
