"""`ds-vicuna eval answer|judge|summarize|rate|plot|run`: the evaluation stages, joined by JSONL files.

    ds-vicuna eval answer --questions vicuna_80 --model embedded --out answers/ours.jsonl
    ds-vicuna eval answer --questions mt_bench --base-url http://127.0.0.1:8000/v1 --api-model gpt-x \
        --temperature fastchat --out model_answer/gpt-x.jsonl
    ds-vicuna eval judge --questions vicuna_80 --answers answers/gpt-x.jsonl answers/ours.jsonl \
        --out judgments/gpt-x_vs_ours.jsonl --base-url http://127.0.0.1:8000/v1 --model judge
    ds-vicuna eval summarize judgments/*.jsonl [--json] [--stored-scores]
    ds-vicuna eval rate model_judgment/gpt-4_pair.jsonl [--json] [--plot ratings.png]
    ds-vicuna eval plot judgments/*.jsonl --reference gpt-x --out-dir plots/
    ds-vicuna eval run --questions mt_bench --models URL1=name1 URL2=name2 --judge URL=judge --out runs/x

Also runnable as `python -m ds_vicuna.eval.cli ...` (same arguments after `eval`).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from ds_vicuna.model.loading import DTYPE_CHOICES
from ds_vicuna.data.question_sets import BUNDLED_SETS
from ds_vicuna.eval.answer import DEFAULT_ANSWER_TOKENS


def register(subparsers) -> None:
    """Add `eval` and its subcommands to the `ds-vicuna` parser."""
    parser = subparsers.add_parser("eval", help="answer questions, judge answers, summarize, rate, plot, run all")
    stages = parser.add_subparsers(dest="eval_command", required=True)
    _add_answer(stages.add_parser("answer", help="answer a question set (local checkpoint or endpoint)"))
    _add_judge(stages.add_parser("judge", help="LLM-as-a-judge over two (or more) answer files"))
    _add_summarize(stages.add_parser("summarize", help="totals, win rates, intervals, consistency, lengths"))
    _add_rate(stages.add_parser("rate", help="Bradley-Terry ratings with intervals from pairwise judgments"))
    _add_plot(stages.add_parser("plot", help="PNG charts from judgments or summaries"))
    _add_run(stages.add_parser("run", help="answers, judgments, summary, ratings, plots, report: one command"))


def _add_client_flags(parser, model_flag: str, model_help: str) -> None:
    parser.add_argument("--base-url", help="OpenAI-compatible API root, e.g. http://127.0.0.1:8000/v1 "
                                           "(default: $OPENAI_BASE_URL)")
    parser.add_argument(model_flag, dest="api_model", help=model_help)
    parser.add_argument("--api-key", help="default: $OPENAI_API_KEY")
    parser.add_argument("--workers", type=int, default=4, help="requests in flight")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    parser.add_argument("--max-attempts", type=int, default=6, help="tries per request, retries included")
    parser.add_argument("--backoff", type=float, default=1.0, help="first retry wait in seconds, doubled per retry")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_answer(p) -> None:
    p.add_argument("--questions", default="vicuna_80",
                   help=f"question file or bundled set ({', '.join(BUNDLED_SETS)})")
    p.add_argument("--out", required=True, help="answer JSONL (appended; answered questions are skipped)")
    p.add_argument("--model", help="local checkpoint folder or 'embedded'; omit to answer from --base-url")
    p.add_argument("--adapter", metavar="PATH",
                   help="local model: a LoRA adapter folder (peft's, e.g. `ds-vicuna export` of a LoRA run) applied "
                        "to --model, its base; its template and tokenizer are used")
    p.add_argument("--model-id", help="model_id written in the records (default: model name, or the adapter's "
                                      "folder name)")
    p.add_argument("--batch-size", type=int, default=8, help="questions per generate call (local)")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_ANSWER_TOKENS,
                   help=f"new tokens per reply (default {DEFAULT_ANSWER_TOKENS}, FastChat's gen_model_answer for "
                        "MT-bench and Vicuna-bench)")
    p.add_argument("--temperature", type=_temperature, default=0.0,
                   help="0 = greedy; 'fastchat' = FastChat's per-category MT-bench temperatures")
    p.add_argument("--device", default="auto", help="local model: auto | cuda | cuda:N | cpu")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="local model: auto = bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU")
    _add_client_flags(p, "--api-model", "endpoint model name when answering from --base-url")
    p.set_defaults(func=cmd_answer)


def _temperature(value: str):
    from ds_vicuna.eval.answer import PER_CATEGORY

    if value == PER_CATEGORY:
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or '{PER_CATEGORY}', got {value!r}") from None


def _add_question_flags(p) -> None:
    p.add_argument("--questions", default="vicuna_80",
                   help=f"question file or bundled set ({', '.join(BUNDLED_SETS)})")
    p.add_argument("--reference-answers", help="FastChat reference answer file (choices[0].turns per question), "
                                                "e.g. reference_answer/gpt-4.jsonl; the bundled mt_bench and "
                                                "vicuna_bench sets bring FastChat's")
    _add_inline_flag(p)


def _add_inline_flag(p) -> None:
    p.add_argument("--inline-references", action="store_true",
                   help="judge with the questions' own `reference` fields (FastChat never reads them: it uses "
                        "its reference answer file, which is the default here too for MT-bench's questions, "
                        "bundled or given as a file)")


def _add_prompt_flag(p) -> None:
    p.add_argument("--judge-prompts", help="judge prompt file in FastChat's judge_prompts.jsonl format, or a "
                                           "bundled set: mt_bench (FastChat's eight prompts), vicuna (the Vicuna "
                                           "post's three); default: vicuna for pairwise judging of single-turn "
                                           "questions, mt_bench otherwise")


def _add_stats_flags(p) -> None:
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")


def _add_judge(p) -> None:
    _add_question_flags(p)
    p.add_argument("--answers", nargs="+", required=True,
                   help="answer files; pairwise: two or more (every pair, model_1 = earlier file)")
    p.add_argument("--mode", choices=["pairwise", "single"], default="pairwise")
    p.add_argument("--out", required=True, help="judgment JSONL (appended; reruns skip what is there)")
    p.add_argument("--baseline", help="pairwise: judge every model against this one only (its model_id)")
    p.add_argument("--no-swap", action="store_true", help="pairwise: judge only with model_1 shown first")
    _add_prompt_flag(p)
    p.add_argument("--max-tokens", type=int, default=2048, help="judge reply length (FastChat: 2048)")
    p.add_argument("--temperature", type=float, default=0.0)
    _add_client_flags(p, "--model", "judge model name (default: $DS_VICUNA_JUDGE_MODEL)")
    p.set_defaults(func=_reported(cmd_judge))


def _add_reading_flags(p) -> None:
    p.add_argument("--questions", help="question file or bundled set naming categories, for judgment files "
                                       "that do not store them (FastChat's, Vicuna review files)")
    p.add_argument("--stored-scores", action="store_true",
                   help="use the scores and verdicts stored in the files instead of re-reading the judge's text "
                        "(reproduces figures published from them)")
    p.add_argument("--judge-prompts", action="append", default=[],
                   help="extra judge prompt file whose prompt names appear in the judgments (repeatable)")
    p.add_argument("--answers", nargs="+", default=[],
                   help="answer files of the judged models, for answer lengths and the length-controlled "
                        "preference where the judgments do not record lengths (FastChat's)")


def _add_summarize(p) -> None:
    p.add_argument("files", nargs="+", help="judgment files: ours, FastChat's model_judgment/*.jsonl, or "
                                            "Vicuna review_<m1>_<m2>.jsonl")
    p.add_argument("--json", action="store_true",
                   help="print a JSON list: per file in input order, one object per model pair, then grades")
    _add_reading_flags(p)
    _add_stats_flags(p)
    p.set_defaults(func=_reported(cmd_summarize))


def _add_rate(p) -> None:
    p.add_argument("files", nargs="+", help="pairwise judgment files (any layout summarize reads)")
    p.add_argument("--json", action="store_true", help="print the ratings as JSON")
    p.add_argument("--plot", help="also write a PNG of the ratings with their intervals here")
    _add_reading_flags(p)
    _add_stats_flags(p)
    p.set_defaults(func=_reported(cmd_rate))


def _add_plot(p) -> None:
    p.add_argument("inputs", nargs="+", help="judgment files (intervals everywhere), or summary JSON from "
                                             "`eval summarize --json`")
    p.add_argument("--out-dir", default="plots", help="where the PNGs go")
    p.add_argument("--reference", help="the model at 100%% in relative_quality.png (default: first pair's model_1)")
    p.add_argument("--ratings", action="store_true", help="also draw ratings.png (judgment files only)")
    _add_reading_flags(p)
    p.set_defaults(func=_reported(cmd_plot))


def _add_run(p) -> None:
    p.add_argument("--questions", default="mt_bench", help="question file or bundled set")
    p.add_argument("--reference-answers", help="FastChat reference answer file (bundled sets bring their own)")
    _add_inline_flag(p)
    p.add_argument("--models", nargs="+", required=True, metavar="URL=NAME",
                   help="OpenAI-compatible endpoint and the model name it serves, one per model")
    p.add_argument("--judge", required=True, metavar="URL=NAME", help="the judge's endpoint and model name")
    p.add_argument("--out", required=True, help="output folder (reruns resume)")
    p.add_argument("--mode", choices=["both", "single", "pairwise"], default="both",
                   help="single-answer grades, pairwise judgments, or both (default)")
    p.add_argument("--baseline", help="pairwise: every model against this one (default: every pair)")
    p.add_argument("--reference", help="the model at 100%% in the relative-quality view (default: first model)")
    _add_prompt_flag(p)
    p.add_argument("--api-key", help="for every endpoint (default: $OPENAI_API_KEY)")
    p.add_argument("--workers", type=int, default=4, help="requests in flight per stage")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_ANSWER_TOKENS,
                   help=f"answer length (FastChat: {DEFAULT_ANSWER_TOKENS})")
    p.add_argument("--temperature", type=_temperature, default="fastchat",
                   help="answer temperature, or 'fastchat' for MT-bench's per-category ones (default)")
    p.add_argument("--judge-max-tokens", type=int, default=2048)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument("--max-attempts", type=int, default=6, help="tries per request, retries included")
    p.add_argument("--backoff", type=float, default=1.0, help="first retry wait in seconds, doubled per retry")
    _add_stats_flags(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_reported(cmd_run))


def _reported(command):
    """Bad input (a file, line, field or flag named in the message) exits 2 with that message, not a traceback."""
    def run(args) -> int:
        from ds_vicuna.data.jsonl import RecordError

        try:
            return command(args)
        except (RecordError, ValueError, KeyError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2

    return run


def _client(args):
    from ds_vicuna.eval.judge_client import ChatClient, RetryPolicy

    retry = RetryPolicy(max_attempts=args.max_attempts, base_wait=args.backoff)
    return ChatClient.from_env(args.base_url, args.api_model, args.api_key, timeout=args.timeout, retry=retry)


def cmd_answer(args) -> int:
    from pathlib import Path

    from ds_vicuna.eval.answer import PER_CATEGORY, ApiBackend, LocalBackend, fastchat_temperature, run_answers
    from ds_vicuna.eval.questions import load_questions

    questions = load_questions(args.questions)
    per_category = fastchat_temperature if args.temperature == PER_CATEGORY else None
    temperature = 0.0 if per_category else args.temperature
    if args.model:
        try:
            backend = LocalBackend(args.model, max_new_tokens=args.max_tokens, temperature=temperature,
                                   device=args.device, dtype=args.dtype, adapter=args.adapter)
        except (FileNotFoundError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        model_id = args.model_id or (Path(args.adapter).name if args.adapter else _local_model_id(args.model))
        chunk = args.batch_size
    else:
        if not args.api_model:
            print("error: give --model (a local checkpoint or 'embedded') or --api-model with --base-url",
                  file=sys.stderr)
            return 2
        client = _client(args)
        backend = ApiBackend(client, args.max_tokens, temperature, args.workers)
        model_id, chunk = args.model_id or client.model, max(args.batch_size, 4 * args.workers)
    stats = run_answers(questions, backend, args.out, model_id, chunk_size=chunk, progress=not args.quiet,
                        temperature_of=per_category)
    print(f"answers -> {args.out}: {stats.written} written, {stats.skipped} already there, {stats.failed} failed")
    return 1 if stats.failed else 0


def _local_model_id(model: str) -> str:
    from pathlib import Path

    from ds_vicuna.model.embedded import EMBEDDED_MODEL

    return EMBEDDED_MODEL if model == "embedded" else Path(model).resolve().name


def cmd_judge(args) -> int:
    from ds_vicuna.eval.answer_files import load_answers
    from ds_vicuna.eval.judge import plan_tasks, run_judge
    from ds_vicuna.eval.judge_prompts import JudgeMode, default_prompt_set, load_prompt_set
    from ds_vicuna.eval.questions import load_for_judging

    questions, references = load_for_judging(args.questions, args.reference_answers, args.inline_references)
    print(references, file=sys.stderr)
    answers = [load_answers(path) for path in args.answers]
    mode = JudgeMode(args.mode)
    prompts = load_prompt_set(args.judge_prompts or default_prompt_set(mode, questions))
    plan = plan_tasks(questions, answers, mode, prompts, swap=not args.no_swap, baseline=args.baseline)
    for warning in plan.warnings():
        print(f"warning: {warning}", file=sys.stderr)
    stats = run_judge(plan.tasks, _client(args), args.out, workers=args.workers, max_tokens=args.max_tokens,
                      temperature=args.temperature, progress=not args.quiet)
    print(f"judgments ({prompts.name} prompts) -> {args.out}: {stats.written} written ({stats.unparsed} "
          f"unparsed), {stats.skipped} already there, {stats.failed} failed after retries")
    if stats.failed:
        print("rerun the same command to retry the failed judgments", file=sys.stderr)
    return 1 if stats.failed else 0


def _categories(args) -> dict | None:
    if not args.questions:
        return None
    from ds_vicuna.eval.questions import load_questions

    return {q.question_id: q.category for q in load_questions(args.questions)}


def _prompt_sets(args) -> list:
    from ds_vicuna.eval.judge_prompts import load_prompt_set

    return [load_prompt_set(p) for p in args.judge_prompts]


def _options(args):
    from ds_vicuna.eval.summarize import Options

    return Options(resamples=args.bootstrap, seed=args.seed)


def _read(args, paths):
    from ds_vicuna.eval.answer_files import load_answers
    from ds_vicuna.eval.judgments import attach_answer_lengths, read_many

    loaded = read_many(paths, _categories(args), stored=args.stored_scores, prompt_sets=_prompt_sets(args))
    answers = [load_answers(p) for p in args.answers]
    for file in loaded:
        attach_answer_lengths(file, answers)
    return loaded


def cmd_summarize(args) -> int:
    from ds_vicuna.eval.summarize import dumps, format_table, summarize_loaded

    summaries = [s for loaded in _read(args, args.files)
                 for s in summarize_loaded(loaded, args.stored_scores, _options(args))]
    print(dumps(summaries) if args.json else format_table(summaries))
    return 0


def cmd_rate(args) -> int:
    from ds_vicuna.eval.ratings import format_ratings, rate

    result = rate(_read(args, args.files), _options(args))
    print(json.dumps(result, indent=2) if args.json else format_ratings(result))
    if args.plot:
        _save_figure("plot_ratings", result, args.plot)
        print(f"ratings plot -> {args.plot}", file=sys.stderr)
    return 0


def _save_figure(function: str, data, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ds_vicuna.eval import plot

    fig = getattr(plot, function)(data)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def cmd_plot(args) -> int:
    from ds_vicuna.eval.plot import load_inputs, plot_all
    from ds_vicuna.eval.summarize import summarize_loaded

    judgment_paths = [p for p in args.inputs if not str(p).endswith(".json")]
    summaries, _ = load_inputs([p for p in args.inputs if str(p).endswith(".json")])
    loaded = _read(args, judgment_paths)
    summaries += [s for f in loaded for s in summarize_loaded(f, args.stored_scores)]
    ratings = None
    if args.ratings:
        from ds_vicuna.eval.ratings import rate

        if not loaded:
            raise ValueError("--ratings needs judgment files (summary JSON holds no battles)")
        ratings = rate(loaded)
    written, skipped = plot_all(summaries, args.out_dir, loaded=loaded, reference=args.reference,
                                ratings=ratings)
    for reason in skipped:
        print(f"skipped {reason}", file=sys.stderr)
    for path in written:
        print(path)
    return 0


def cmd_run(args) -> int:
    from pathlib import Path

    from ds_vicuna.eval.answer import PER_CATEGORY
    from ds_vicuna.eval.judge_client import RetryPolicy
    from ds_vicuna.eval.run import run_eval
    from ds_vicuna.eval.run_settings import RunSettings, endpoints, parse_endpoint

    settings = RunSettings(
        questions=args.questions, models=endpoints(args.models, "--models"),
        judge=parse_endpoint(args.judge, "--judge"), out_dir=Path(args.out), mode=args.mode,
        reference_answers=args.reference_answers, inline_references=args.inline_references,
        judge_prompts=args.judge_prompts, baseline=args.baseline,
        reference=args.reference, api_key=args.api_key, workers=args.workers, max_tokens=args.max_tokens,
        temperature=None if args.temperature == PER_CATEGORY else args.temperature,
        judge_max_tokens=args.judge_max_tokens, timeout=args.timeout,
        retry=RetryPolicy(max_attempts=args.max_attempts, base_wait=args.backoff), resamples=args.bootstrap,
        seed=args.seed, progress=not args.quiet)
    result = run_eval(settings)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(result.references, file=sys.stderr)
    print(f"report -> {result.out_dir / 'report.md'}")
    if not result.complete:
        print("some answers or judgments failed; rerun the same command to retry them", file=sys.stderr)
    return 0 if result.complete else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point for `python -m ds_vicuna.eval.cli <answer|judge|summarize|rate|plot|run> ...`."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="ds-vicuna")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
