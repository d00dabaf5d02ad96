"""`ds-vicuna eval summarize`: Table-2-style totals, relative scores and win/tie/loss counts per judgment file.

    ds-vicuna eval summarize judgments/gpt35_vs_ours.jsonl review_alpaca-13b_vicuna-13b.jsonl [--json]

Inputs: our judgment files (`eval judge`) and FastChat's legacy review files `review_<model1>_<model2>.jsonl`
(records with `question_id`, `text`, `score`); for those the scores are re-read from the judge's `text`, the
stored `score` is ignored (FastChat stored -1 for judgments it could not parse).

How a pairwise item (one question turn) is combined:
- its judgments are the orders judged (two with swapping, one for `--no-swap` runs and legacy files);
- if any of them is unparsed, the item is left out of totals and wins (`excluded`); each unparsed judgment is
  counted in `unparsed`. Using the other order alone would bring back the position bias swapping removes;
- each model's item score is the mean of its scores over the orders; `score_1`/`score_2` sum those;
- a win needs consistency: model 1 wins only if it scored higher in EVERY order, model 2 likewise; anything
  else (a tie in some order, or orders that disagree) is a tie. Disagreeing orders are also counted as
  `inconsistent`.
`relative_score` = 100 * score_2 / score_1 (Vicuna's "relative response quality" of model 2 to model 1).
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ds_vicuna.eval.records import RecordError, iter_jsonl
from ds_vicuna.eval.score_parsing import parse_pair_scores

LEGACY_NAME = re.compile(r"^review_(?P<m1>[^_]+)_(?P<m2>[^_]+)\.jsonl$")
UNKNOWN_CATEGORY = "unknown"


@dataclass
class Tally:
    """Totals over a set of combined items."""

    n: int = 0
    score_1: float = 0.0
    score_2: float = 0.0
    wins_1: int = 0
    ties: int = 0
    wins_2: int = 0
    inconsistent: int = 0

    def add(self, score_1: float, score_2: float, verdicts: list[int]) -> None:
        self.n += 1
        self.score_1 += score_1
        self.score_2 += score_2
        if all(v > 0 for v in verdicts):
            self.wins_1 += 1
        elif all(v < 0 for v in verdicts):
            self.wins_2 += 1
        else:
            self.ties += 1
        self.inconsistent += len(set(verdicts)) > 1

    def as_dict(self) -> dict:
        rate = (lambda k: round(k / self.n, 4)) if self.n else (lambda k: None)
        return {"n": self.n, "score_1": round(self.score_1, 4), "score_2": round(self.score_2, 4),
                "wins_1": self.wins_1, "ties": self.ties, "wins_2": self.wins_2,
                "relative_score": round(100 * self.score_2 / self.score_1, 2) if self.score_1 else None,
                "win_rate_1": rate(self.wins_1), "tie_rate": rate(self.ties), "win_rate_2": rate(self.wins_2),
                "inconsistent": self.inconsistent}


@dataclass
class PairSummary:
    file: str
    source: str
    """"ds-vicuna" (our judgment file) or "fastchat-legacy"."""
    model_1: str
    model_2: str
    total: Tally = field(default_factory=Tally)
    categories: dict[str, Tally] = field(default_factory=dict)
    unparsed: int = 0
    excluded: int = 0
    judges: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        """The `--json` object: the contract keys first, extras after."""
        total = self.total.as_dict()
        out = {"model_1": self.model_1, "model_2": self.model_2, "n": total["n"], "score_1": total["score_1"],
               "score_2": total["score_2"], "wins_1": total["wins_1"], "ties": total["ties"],
               "wins_2": total["wins_2"], "unparsed": self.unparsed}
        out.update({k: total[k] for k in ("relative_score", "win_rate_1", "tie_rate", "win_rate_2",
                                          "inconsistent")})
        out.update(excluded=self.excluded, file=self.file, source=self.source, judges=self.judges,
                   categories={c: t.as_dict() for c, t in sorted(self.categories.items())})
        return out


@dataclass
class _Judgment:
    item: tuple
    category: str
    parsed: bool
    score_1: float | None
    score_2: float | None


def summarize_file(path: str | Path, categories: dict | None = None) -> PairSummary:
    """Summarize one pairwise judgment file (ours or FastChat legacy).

    Args:
        path: the file.
        categories: question_id -> category, for legacy files (which do not store categories).

    Raises:
        RecordError: an unreadable file, a mixed or single-mode file, or a legacy name without two models.
    """
    path = Path(path)
    rows = list(iter_jsonl(path, allow_torn_tail=True))
    if not rows:
        raise RecordError(f"{path}: no judgments")
    if "mode" in rows[0][1]:
        summary, judgments = _read_ours(path, rows)
    else:
        summary, judgments = _read_legacy(path, rows, categories or {})
    by_item: dict[tuple, list[_Judgment]] = defaultdict(list)
    for judgment in judgments:
        by_item[judgment.item].append(judgment)
    for item_judgments in by_item.values():
        _combine(summary, item_judgments)
    return summary


def _combine(summary: PairSummary, judgments: list[_Judgment]) -> None:
    summary.unparsed += sum(not j.parsed for j in judgments)
    if not all(j.parsed for j in judgments):
        summary.excluded += 1
        return
    score_1 = sum(j.score_1 for j in judgments) / len(judgments)
    score_2 = sum(j.score_2 for j in judgments) / len(judgments)
    verdicts = [(j.score_1 > j.score_2) - (j.score_1 < j.score_2) for j in judgments]
    summary.total.add(score_1, score_2, verdicts)
    summary.categories.setdefault(judgments[0].category, Tally()).add(score_1, score_2, verdicts)


def _read_ours(path: Path, rows: list[tuple[int, dict]]) -> tuple[PairSummary, list[_Judgment]]:
    first = rows[0][1]
    if first.get("mode") != "pairwise":
        raise RecordError(f"{path}:{rows[0][0]}: mode {first.get('mode')!r}; summarize reads pairwise judgments "
                          "(single-answer grades: see summarize_single)")
    summary = PairSummary(str(path), "ds-vicuna", first["model_1"], first["model_2"])
    judgments, seen, judges = [], set(), []
    for line, record in rows:
        if (record.get("mode"), record.get("model_1"), record.get("model_2")) != \
                ("pairwise", summary.model_1, summary.model_2):
            raise RecordError(f"{path}:{line}: a judgment of another mode or pair; one comparison per file")
        if record.get("key") in seen:  # never written twice by `eval judge`; tolerate hand-merged files
            continue
        seen.add(record.get("key"))
        if record.get("judge") not in judges:
            judges.append(record.get("judge"))
        parsed = bool(record.get("parsed")) and record.get("score_1") is not None \
            and record.get("score_2") is not None
        judgments.append(_Judgment((record["question_id"], record.get("turn", 1)),
                                   record.get("category") or UNKNOWN_CATEGORY, parsed,
                                   record.get("score_1"), record.get("score_2")))
    summary.judges = judges
    return summary, judgments


def _read_legacy(path: Path, rows: list[tuple[int, dict]], categories: dict) -> tuple[PairSummary, list[_Judgment]]:
    match = LEGACY_NAME.match(path.name)
    if not match:
        raise RecordError(f"{path}: a FastChat review file must be named review_<model1>_<model2>.jsonl "
                          "(model names without '_')")
    summary = PairSummary(str(path), "fastchat-legacy", match["m1"], match["m2"])
    judgments = []
    for line, record in rows:
        if record.get("reviewer_id") and record["reviewer_id"] not in summary.judges:
            summary.judges.append(record["reviewer_id"])
        if "question_id" not in record or "text" not in record:
            raise RecordError(f"{path}:{line}: a FastChat review record needs 'question_id' and 'text'")
        result = parse_pair_scores(record["text"] if isinstance(record["text"], str) else None)
        category = record.get("category") or categories.get(record["question_id"], UNKNOWN_CATEGORY)
        judgments.append(_Judgment((record["question_id"], 1), category, result.parsed,
                                   result.score_1, result.score_2))
    return summary, judgments


def summarize_single(path: str | Path) -> dict:
    """Per-model totals of a single-answer grading file: n, total, mean, per-category means, unparsed."""
    per_model: dict[str, dict] = {}
    for line, record in iter_jsonl(path, allow_torn_tail=True):
        if record.get("mode") != "single":
            raise RecordError(f"{path}:{line}: not a single-answer judgment")
        stats = per_model.setdefault(record["model"], {"n": 0, "total": 0.0, "unparsed": 0, "categories": {}})
        if not record.get("parsed") or record.get("score") is None:
            stats["unparsed"] += 1
            continue
        stats["n"] += 1
        stats["total"] += record["score"]
        cat = stats["categories"].setdefault(record.get("category") or UNKNOWN_CATEGORY, [0, 0.0])
        cat[0] += 1
        cat[1] += record["score"]
    return {"file": str(path), "mode": "single", "models": {
        m: {"n": s["n"], "total": round(s["total"], 4), "mean": round(s["total"] / s["n"], 4) if s["n"] else None,
            "unparsed": s["unparsed"],
            "categories": {c: round(t / k, 4) for c, (k, t) in sorted(s["categories"].items())}}
        for m, s in per_model.items()}}


def file_mode(path: str | Path) -> str:
    """"single" for a single-answer grading file, else "pairwise" (ours or legacy)."""
    for _, record in iter_jsonl(path, allow_torn_tail=True):
        return "single" if record.get("mode") == "single" else "pairwise"
    return "pairwise"


def summarize_files(paths: Sequence[str | Path], categories: dict | None = None) -> list[dict]:
    """One summary object per input file, in input order (the `--json` output)."""
    return [summarize_single(p) if file_mode(p) == "single" else summarize_file(p, categories).as_dict()
            for p in paths]


def format_table(summaries: list[dict]) -> str:
    """Plain-text report: a Table-2-style line per pair, then per-category lines."""
    lines = []
    for s in summaries:
        if s.get("mode") == "single":
            lines.append(f"{s['file']} (single-answer grades)")
            for model, m in s["models"].items():
                lines.append(f"  {model:<28} n={m['n']:<4} mean={m['mean']}  total={m['total']}  "
                             f"unparsed={m['unparsed']}")
            continue
        rel = f"{s['relative_score']:.1f}%" if s["relative_score"] is not None else "n/a"
        lines.append(f"{s['file']}\n  {s['model_1']} vs {s['model_2']}: n={s['n']}  total {s['score_1']:g} / "
                     f"{s['score_2']:g}  relative {rel}  wins {s['wins_1']} / ties {s['ties']} / "
                     f"wins {s['wins_2']}  unparsed {s['unparsed']} (items excluded {s['excluded']}, "
                     f"inconsistent orders {s['inconsistent']})")
        for cat, c in s["categories"].items():
            lines.append(f"    {cat:<16} n={c['n']:<3} {c['score_1']:g} / {c['score_2']:g}  "
                         f"W/T/L {c['wins_1']}/{c['ties']}/{c['wins_2']}")
    return "\n".join(lines)


def dumps(summaries: list[dict]) -> str:
    return json.dumps(summaries, indent=2)
