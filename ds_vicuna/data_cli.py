"""`ds-vicuna data clean|split|stats`: the data stages on the command line.

    ds-vicuna data clean ds_vicuna/data/sharegpt_sample.json out/clean.jsonl --skip-bad --report out/clean.json
    ds-vicuna data split out/clean.jsonl out/split.jsonl --model embedded --template vicuna_v1.1 --max-length 512
    ds-vicuna data stats out/split.jsonl --model embedded --template vicuna_v1.1
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_TEMPLATE = "vicuna_v1.1"


def register(subparsers) -> None:
    """Add `data` with its `clean`, `split` and `stats` subcommands."""
    data = subparsers.add_parser("data", help="clean, split and inspect conversation data")
    sub = data.add_subparsers(dest="data_command", required=True)

    clean = sub.add_parser("clean", help="HTML -> Markdown, fix roles, filter; counts every drop by reason")
    clean.add_argument("input", help="ShareGPT or OpenAI conversations (JSON list or JSONL)")
    clean.add_argument("output", help="cleaned conversations (ShareGPT JSONL)")
    clean.add_argument("--skip-bad", action="store_true", help="skip and count unreadable records instead of failing")
    clean.add_argument("--lang", help="keep only this language (ISO 639-1 code, e.g. en), detected by langdetect")
    clean.add_argument("--blocked-words", type=Path, help="file: one word or phrase a line; matching conversations "
                                                          "are dropped")
    clean.add_argument("--min-chars", type=int, default=0, help="drop conversations with a shorter assistant reply")
    clean.add_argument("--workers", type=int, default=None, help="processes (default: every core)")
    clean.add_argument("--report", type=Path, help="write the counts as JSON here")
    clean.add_argument("--no-progress", action="store_true", help="no progress bar")
    clean.set_defaults(func=run_clean)

    split = sub.add_parser("split", help="cut long conversations at turn boundaries to fit --max-length tokens")
    split.add_argument("input")
    split.add_argument("output")
    split.add_argument("--model", required=True, help="local Hugging Face model folder, or 'embedded'")
    split.add_argument("--template", default=DEFAULT_TEMPLATE, help=f"chat template (default {DEFAULT_TEMPLATE})")
    split.add_argument("--max-length", type=int, required=True, help="most tokens per piece")
    split.add_argument("--report", type=Path, help="write the counts as JSON here")
    split.add_argument("--no-progress", action="store_true", help="no progress bar")
    split.set_defaults(func=run_split)

    stats = sub.add_parser("stats", help="conversation, turn, character and token counts")
    stats.add_argument("input")
    stats.add_argument("--model", help="local Hugging Face model folder, or 'embedded': adds token percentiles")
    stats.add_argument("--template", default=DEFAULT_TEMPLATE, help=f"chat template (default {DEFAULT_TEMPLATE})")
    stats.add_argument("--skip-bad", action="store_true", help="skip unreadable records instead of failing")
    stats.add_argument("--json", action="store_true", help="print JSON instead of a table")
    stats.set_defaults(func=run_stats)


def _write_report(path: Path | None, report: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")


def _fail(error: Exception) -> int:
    print(f"ds-vicuna data: error: {error}", file=sys.stderr)
    return 2


def run_clean(args: argparse.Namespace) -> int:
    from ds_vicuna.clean import CleanOptions, clean_file, read_blocked_words
    from ds_vicuna.formats import FormatError

    try:
        options = CleanOptions(lang=args.lang, min_chars=args.min_chars,
                               blocked_words=read_blocked_words(args.blocked_words) if args.blocked_words else ())
        report = clean_file(args.input, args.output, options, workers=args.workers, skip_bad=args.skip_bad,
                            progress=not args.no_progress)
    except (FormatError, OSError, ValueError) as e:
        return _fail(e)
    print(report.table())
    _write_report(args.report, report.as_dict())
    return 0


def run_split(args: argparse.Namespace) -> int:
    from ds_vicuna.formats import FormatError
    from ds_vicuna.split import SplitError, load_tokenizer, split_file

    try:
        tokenizer = load_tokenizer(args.model, args.template)
        report = split_file(args.input, args.output, tokenizer, args.template, args.max_length,
                            progress=not args.no_progress)
    except (FormatError, SplitError, OSError, ValueError) as e:
        return _fail(e)
    print(report.table())
    _write_report(args.report, report.as_dict())
    return 0


def run_stats(args: argparse.Namespace) -> int:
    from ds_vicuna.formats import FormatError
    from ds_vicuna.stats import stats_file

    try:
        stats = stats_file(args.input, args.model, args.template, skip_bad=args.skip_bad)
    except (FormatError, OSError, ValueError) as e:
        return _fail(e)
    print(json.dumps(stats.as_dict(), indent=2) if args.json else f"stats: {args.input}\n{stats.table()}")
    return 0
