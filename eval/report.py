"""The outputs of `eval run` after judging: summary, ratings, Figure 1 numbers, plots and a Markdown report.

The report is a page a person reads before believing a number: every figure has its interval, and judge
reliability (position consistency, unparsed judgments, stored/text disagreements, questions judged without
their reference answer) sits next to the scores it qualifies.
"""
from __future__ import annotations

import statistics as pystats
import time
from pathlib import Path

from ds_vicuna.eval.answer_files import load_answers
from ds_vicuna.eval.run_settings import RunResult, RunSettings, dump


def write_outputs(settings: RunSettings, questions, answer_files: dict[str, Path], judgment_files: list[Path],
                  result: RunResult) -> None:
    """summary.json, ratings.json, relative_quality.json, plots/*.png and report.md into `result.out_dir`."""
    from ds_vicuna.eval.judgments import read_judgments
    from ds_vicuna.eval.plot import plot_all
    from ds_vicuna.eval.ratings import rate
    from ds_vicuna.eval.summarize import Options, relative_quality, summarize_loaded

    out = result.out_dir
    options = Options(resamples=settings.resamples, seed=settings.seed)
    categories = {q.question_id: q.category for q in questions}
    loaded = [read_judgments(p, categories) for p in judgment_files]
    summaries = [s for f in loaded for s in summarize_loaded(f, options=options)]
    result.files.append(dump(summaries, out / "summary.json"))
    ratings = relative = None
    notes = []
    if any(f.pairs for f in loaded):
        try:
            ratings = rate(loaded, options)
            result.files.append(dump(ratings, out / "ratings.json"))
        except ValueError as err:
            notes.append(f"ratings: {err}")
    reference = settings.reference or settings.models[0].model
    if loaded:
        try:
            relative = relative_quality(loaded, reference, options=options)
            result.files.append(dump(relative, out / "relative_quality.json"))
        except ValueError as err:
            notes.append(f"relative quality: {err}")
    plots: list[Path] = []
    if summaries or ratings:
        plots, skipped = plot_all(summaries, out / "plots", loaded=loaded, reference=reference, ratings=ratings)
        notes += skipped
        result.files += plots
    report = render_report(settings, questions, answer_files, summaries, ratings, relative, plots, result, notes)
    (out / "report.md").write_text(report)
    result.files.append(out / "report.md")


def render_report(settings, questions, answer_files, summaries, ratings, relative, plots, result, notes) -> str:
    """The Markdown page (module docstring)."""
    turns = sum(len(q.turns) for q in questions)
    lines = [f"# Evaluation: {settings.questions}", "",
             f"{len(questions)} questions ({turns} turns); models: "
             + ", ".join(f"`{m.model}` ({m.base_url})" for m in settings.models)
             + f"; judge: `{settings.judge.model}` ({settings.judge.base_url}). "
             f"Written {time.strftime('%Y-%m-%d %H:%M:%S')}. Intervals are 95% bootstrap intervals over "
             f"{settings.resamples} resamples of the questions.", ""]
    lines += _status(result)
    lines += _answers_table(answer_files)
    singles = [s for s in summaries if s.get("mode") == "single"]
    pairs = [s for s in summaries if s.get("mode") != "single"]
    if singles:
        lines += _singles_table(singles)
    if ratings:
        lines += _ratings_table(ratings)
    if relative:
        lines += _relative_table(relative)
    if pairs:
        lines += _pairs_table(pairs)
    lines += _reliability(summaries)
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots] + [""]
    return "\n".join(lines)


def _status(result: RunResult) -> list[str]:
    if result.complete and not result.warnings:
        return ["Every answer and judgment is in.", ""]
    lines = ["## Incomplete or qualified", ""]
    for model, failed in result.answers_failed.items():
        if failed:
            lines.append(f"- {failed} answers of `{model}` failed; rerun the same command to retry them.")
    for mode, failed in result.judgments_failed.items():
        if failed:
            lines.append(f"- {failed} {mode} judgments failed; rerun the same command to retry them.")
    lines += [f"- {w}" for w in result.warnings]
    return lines + [""]


def _answers_table(answer_files: dict[str, Path]) -> list[str]:
    lines = ["## Answers", "", "| model | questions answered | mean answer length (chars, all turns) |",
             "|---|---:|---:|"]
    for model, path in answer_files.items():
        answers = load_answers(path) if path.is_file() else {}
        lengths = [len(t) for a in answers.values() for t in a.turns]
        mean = f"{pystats.fmean(lengths):.0f}" if lengths else "n/a"
        lines.append(f"| `{model}` | {len(answers)} | {mean} |")
    return lines + [""]


def _ci(bounds, scale: float = 1.0, digits: int = 1) -> str:
    return f" [{bounds[0] * scale:.{digits}f}, {bounds[1] * scale:.{digits}f}]" if bounds else ""


def _singles_table(singles: list[dict]) -> list[str]:
    lines = ["## Single-answer grades (MT-bench score, 1-10)", "",
             "| model | mean | turn 1 | turn 2 | graded | unparsed |", "|---|---|---:|---:|---:|---:|"]
    for s in singles:
        for model, m in sorted(s["models"].items(), key=lambda kv: -(kv[1]["mean"] or 0)):
            mean = f"{m['mean']:.2f}{_ci(m['ci'].get('mean'), 1, 2)}" if m["mean"] is not None else "n/a"
            t1, t2 = (m["turns"].get(k) for k in ("1", "2"))
            lines.append(f"| `{model}` | {mean} | {t1 if t1 is not None else '-'} | "
                         f"{t2 if t2 is not None else '-'} | {m['n']} | {m['unparsed']} |")
    return lines + [""]


def _ratings_table(ratings: dict) -> list[str]:
    lines = [f"## Ratings (Bradley-Terry, Elo scale) from {ratings['battles']} pairwise battles", "",
             "| rank | model | rating | 95% interval | wins / ties / losses |", "|---:|---|---:|---|---|"]
    for model, m in ratings["models"].items():
        note = f" ({m['note']})" if "note" in m else ""
        lines.append(f"| {m['rank']} | `{model}` | {m['rating']:.0f}{note} | {_ci(m['ci'], 1, 0).strip()} | "
                     f"{m['wins']} / {m['ties']} / {m['losses']} |")
    return lines + [""]


def _relative_table(relative: dict) -> list[str]:
    source = "single-answer grades" if relative["source"] == "single" else "pairwise score totals"
    lines = [f"## Relative quality (% of `{relative['reference']}`, from {source})", "",
             "| model | relative quality | 95% interval |", "|---|---:|---|"]
    for model, m in relative["models"].items():
        value = f"{m['relative']:.1f}%" if m["relative"] is not None else "n/a (not connected)"
        lines.append(f"| `{model}` | {value} | {_ci(m['ci']).strip() or '-'} |")
    return lines + [""]


def _pairs_table(pairs: list[dict]) -> list[str]:
    lines = ["## Pairwise comparisons", "",
             "| model 2 vs model 1 | n | wins 2 / ties / wins 1 | win rate 2 | preference 2 (ties half) | "
             "length-controlled | totals 1 / 2 |", "|---|---:|---|---|---|---|---|"]
    for s in pairs:
        ci = s.get("ci", {})
        win = f"{100 * s['win_rate_2']:.1f}%{_ci(ci.get('win_rate_2'), 100)}" if s["n"] else "n/a"
        pref = f"{100 * s['preference_2']:.1f}%{_ci(ci.get('preference_2'), 100)}" if s["n"] else "n/a"
        lc = (f"{100 * s['lc_preference_2']:.1f}%{_ci(ci.get('lc_preference_2'), 100)}"
              if s.get("lc_preference_2") is not None else "n/a")
        totals = f"{s['score_1']:g} / {s['score_2']:g}" if s["score_1"] is not None else "- (verdicts only)"
        lines.append(f"| `{s['model_2']}` vs `{s['model_1']}` | {s['n']} | {s['wins_2']} / {s['ties']} / "
                     f"{s['wins_1']} | {win} | {pref} | {lc} | {totals} |")
    return lines + [""]


def _reliability(summaries: list[dict]) -> list[str]:
    lines = ["## Judge reliability", ""]
    for s in summaries:
        if s.get("mode") == "single":
            unparsed = sum(m["unparsed"] for m in s["models"].values())
            lines.append(f"- grades ({Path(s['file']).name}): {unparsed} unparsed, "
                         f"{len(s['mismatches'])} stored/text disagreements.")
            continue
        cons = s["consistency"]
        rate = f"{100 * cons['rate']:.1f}%" if cons["rate"] is not None else "n/a"
        lines.append(f"- `{s['model_2']}` vs `{s['model_1']}`: position consistency {rate} of "
                     f"{cons['judged_both_orders']} items judged in both orders (the first-shown answer was "
                     f"favoured {cons['inconsistent_favoring_first_shown']}x, the second "
                     f"{cons['inconsistent_favoring_second_shown']}x); {s['unparsed']} unparsed judgments; "
                     f"{len(s['mismatches'])} stored/text disagreements.")
        if s.get("length"):
            lengths = ", ".join(f"`{m}` {d['mean_chars']:.0f}" for m, d in s["length"].items())
            lines.append(f"  Mean judged answer length (chars): {lengths}.")
    return lines + [""]
