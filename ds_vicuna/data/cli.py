"""`ds-vicuna data clean|split|stats|overlap`: the data stages on the command line.

    ds-vicuna data clean ds_vicuna/data/sharegpt_sample.json out/clean.jsonl --skip-bad --report out/clean.json
    ds-vicuna data split out/clean.jsonl out/split.jsonl --model embedded --template vicuna_v1.1 --max-length 512
    ds-vicuna data stats out/split.jsonl --model embedded --template vicuna_v1.1
    ds-vicuna data stats out/split.jsonl identity.jsonl --weights 1 3 --model embedded   # a mix's token shares
    ds-vicuna data overlap out/split.jsonl --questions vicuna_80 --questions mt_bench     # eval contamination
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ds_vicuna.data.question_sets import BUNDLED_SETS

DEFAULT_TEMPLATE = "vicuna_v1.1"
OVERLAP_EXIT = 3  # `data overlap --fail-on-overlap` found overlap (1 and 2 are errors)


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
    clean.add_argument("--drop-overlap", action="append", default=[], metavar="SET",
                       help="drop conversations sharing an n-gram with this eval set's questions or reference "
                            f"answers (a bundled set: {', '.join(BUNDLED_SETS)}; or a FastChat-style JSONL file); "
                            "repeatable")
    clean.add_argument("--ngram", type=int, default=None, help="words per n-gram for --drop-overlap (default 8)")
    clean.add_argument("--workers", type=int, default=None, help="processes (default: every core)")
    clean.add_argument("--report", type=Path, help="write the counts as JSON here")
    clean.add_argument("--no-progress", action="store_true", help="no progress bar")
    clean.set_defaults(func=run_clean)

    split = sub.add_parser("split", help="cut long conversations at turn boundaries to fit --max-length tokens")
    split.add_argument("input")
    split.add_argument("output")
    split.add_argument("--model", required=True, help="local Hugging Face model folder, or 'embedded'")
    split.add_argument("--template", default=DEFAULT_TEMPLATE,
                       help=f"chat template, or auto: the tokenizer's own if it has one (default {DEFAULT_TEMPLATE})")
    split.add_argument("--max-length", type=int, required=True, help="most tokens per piece")
    split.add_argument("--workers", type=int, default=None, help="processes (default: every core)")
    split.add_argument("--report", type=Path, help="write the counts as JSON here")
    split.add_argument("--no-progress", action="store_true", help="no progress bar")
    split.set_defaults(func=run_split)

    stats = sub.add_parser("stats", help="conversation, turn, character and token counts; a mix's shares")
    stats.add_argument("input", nargs="*", help="one file, or the files of a mix (see --weights)")
    stats.add_argument("--weights", type=float, nargs="+", help="one sampling weight per input (default 1 each)")
    stats.add_argument("--config", type=Path, help="a training config: its data.train_path mix, model and template")
    stats.add_argument("--model", help="local Hugging Face model folder, or 'embedded': adds token percentiles")
    stats.add_argument("--template", default=None, help=f"chat template (default {DEFAULT_TEMPLATE})")
    stats.add_argument("--skip-bad", action="store_true", help="skip unreadable records instead of failing")
    stats.add_argument("--workers", type=int, default=None, help="processes measuring tokens (default: every core)")
    stats.add_argument("--json", action="store_true", help="print JSON instead of a table")
    stats.set_defaults(func=run_stats)

    overlap = sub.add_parser("overlap", help="training conversations sharing long n-grams with eval questions "
                                             "or reference answers (contamination check)")
    overlap.add_argument("input", nargs="+", help="training conversations (any format `data clean` reads)")
    overlap.add_argument("--questions", action="append", required=True, metavar="SET",
                         help=f"a bundled set ({', '.join(BUNDLED_SETS)}: the sets `eval --questions` names, "
                              "with their reference answers) or a FastChat-style question or reference-answer "
                              "JSONL file; repeatable")
    overlap.add_argument("--ngram", type=int, default=None, help="words per n-gram (default 8)")
    overlap.add_argument("--fail-on-overlap", action="store_true",
                         help=f"exit {OVERLAP_EXIT} when any training conversation overlaps (a pipeline stops there)")
    overlap.add_argument("--workers", type=int, default=None, help="processes (default: every core)")
    overlap.add_argument("--skip-bad", action="store_true", help="skip unreadable records instead of failing")
    overlap.add_argument("--report", type=Path, help="write every overlapping conversation as JSON here")
    overlap.add_argument("--no-progress", action="store_true", help="no progress bar")
    overlap.set_defaults(func=run_overlap)


def _write_report(path: Path | None, report: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")


def _fail(error: Exception) -> int:
    print(f"ds-vicuna data: error: {error}", file=sys.stderr)
    return 2


def run_clean(args: argparse.Namespace) -> int:
    from ds_vicuna.data.clean import CleanOptions, clean_file, read_blocked_words
    from ds_vicuna.data.formats import FormatError
    from ds_vicuna.data.overlap import DEFAULT_NGRAM, build_index

    try:
        options = CleanOptions(lang=args.lang, min_chars=args.min_chars,
                               blocked_words=read_blocked_words(args.blocked_words) if args.blocked_words else ())
        overlap = build_index(args.drop_overlap, args.ngram or DEFAULT_NGRAM) if args.drop_overlap else None
        report = clean_file(args.input, args.output, options, workers=args.workers, skip_bad=args.skip_bad,
                            progress=not args.no_progress, overlap=overlap)
    except (FormatError, OSError, ValueError) as e:
        return _fail(e)
    print(report.table())
    _write_report(args.report, report.as_dict())
    return 0


def run_split(args: argparse.Namespace) -> int:
    from ds_vicuna.data.formats import FormatError
    from ds_vicuna.data.split import SplitError, split_file
    from ds_vicuna.model.tokenizer import check_max_length, load_tokenizer, resolve_template

    try:
        check_max_length(args.model, args.max_length, name="--max-length")
        template, why = resolve_template(args.template, args.model)
        if template != args.template:
            print(f"[split] {why}", file=sys.stderr)
        tokenizer = load_tokenizer(args.model, template)
        report = split_file(args.input, args.output, tokenizer, template, args.max_length,
                            progress=not args.no_progress, workers=args.workers)
    except (FormatError, SplitError, OSError, ValueError) as e:
        return _fail(e)
    print(report.table())
    _write_report(args.report, report.as_dict())
    return 0


def _stats_sources(args: argparse.Namespace) -> tuple[list[tuple[str, float]], str | None, str]:
    """(path, weight) sources, model and template from the inputs and --weights, or from --config."""
    from ds_vicuna.config import load_config

    if args.config is not None:
        if args.input or args.weights:
            raise ValueError("give either --config or input files (with --weights), not both")
        cfg = load_config(args.config)
        sources = [(s.path, s.weight) for s in cfg.data.train_sources()]
        if not sources:
            raise ValueError(f"{args.config}: data.train_path is empty")
        return sources, args.model or cfg.model.name_or_path, args.template or cfg.model.template
    if not args.input:
        raise ValueError("give an input file (or several, with --weights), or --config")
    weights = args.weights or [1.0] * len(args.input)
    if len(weights) != len(args.input):
        raise ValueError(f"--weights: {len(weights)} weights for {len(args.input)} inputs; give one per input")
    if any(not w > 0 for w in weights):
        raise ValueError(f"--weights: every weight must be > 0, got {weights}")
    return list(zip(args.input, weights)), args.model, args.template or DEFAULT_TEMPLATE


def run_stats(args: argparse.Namespace) -> int:
    import os

    from ds_vicuna.config import ConfigError
    from ds_vicuna.data.formats import FormatError
    from ds_vicuna.data.stats import stats_mix

    try:
        sources, model, template = _stats_sources(args)
        stats = stats_mix(sources, model, template, skip_bad=args.skip_bad, workers=args.workers or os.cpu_count())
    except (ConfigError, FormatError, OSError, ValueError) as e:
        return _fail(e)
    print(json.dumps(stats.as_dict(), indent=2) if args.json else stats.table())
    return 0


def run_overlap(args: argparse.Namespace) -> int:
    import os

    from ds_vicuna.data.formats import FormatError
    from ds_vicuna.data.overlap import DEFAULT_NGRAM, build_index, overlap_files

    try:
        index = build_index(args.questions, args.ngram or DEFAULT_NGRAM)
        report = overlap_files(args.input, index, args.questions, workers=args.workers or os.cpu_count() or 1,
                               skip_bad=args.skip_bad, progress=not args.no_progress)
    except (FormatError, OSError, ValueError) as e:
        return _fail(e)
    print(report.table())
    _write_report(args.report, report.as_dict())
    if args.fail_on_overlap and report.hits:
        print(f"data overlap: {len(report.hits)} training conversation(s) overlap the eval sets "
              f"(--fail-on-overlap): exit {OVERLAP_EXIT}", file=sys.stderr)
        return OVERLAP_EXIT
    return 0
