"""`ds-vicuna eval answer|judge|summarize|plot`: the evaluation stages, joined by JSONL files.

    ds-vicuna eval answer --questions vicuna_80 --model embedded --out answers/ours.jsonl
    ds-vicuna eval answer --questions vicuna_80 --base-url http://127.0.0.1:8000/v1 --api-model gpt-x \
        --out answers/gpt-x.jsonl
    ds-vicuna eval judge --questions vicuna_80 --answers answers/gpt-x.jsonl answers/ours.jsonl \
        --out judgments/gpt-x_vs_ours.jsonl --base-url http://127.0.0.1:8000/v1 --model judge
    ds-vicuna eval summarize judgments/*.jsonl [--json]
    ds-vicuna eval plot summary.json --out-dir plots/

Also runnable as `python -m ds_vicuna.eval.cli ...` (same arguments after `eval`).
"""
from __future__ import annotations

import argparse
import logging
import sys


def register(subparsers) -> None:
    """Add `eval` and its four subcommands to the `ds-vicuna` parser."""
    parser = subparsers.add_parser("eval", help="answer questions, judge answers, summarize, plot")
    stages = parser.add_subparsers(dest="eval_command", required=True)
    _add_answer(stages.add_parser("answer", help="answer a question set (local checkpoint or endpoint)"))
    _add_judge(stages.add_parser("judge", help="LLM-as-a-judge over two (or more) answer files"))
    _add_summarize(stages.add_parser("summarize", help="totals, relative scores, wins/ties/losses"))
    _add_plot(stages.add_parser("plot", help="PNG charts from summaries"))


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
    p.add_argument("--questions", default="vicuna_80", help="question file or bundled set (vicuna_80, mt_bench_mini)")
    p.add_argument("--out", required=True, help="answer JSONL (appended; answered questions are skipped)")
    p.add_argument("--model", help="local checkpoint folder or 'embedded'; omit to answer from --base-url")
    p.add_argument("--model-id", help="model_id written in the records (default: model name)")
    p.add_argument("--batch-size", type=int, default=8, help="questions per generate call (local)")
    p.add_argument("--max-tokens", type=int, default=512, help="new tokens per reply")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--device", default="auto", help="local model: auto | cuda | cuda:N | cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="local model: auto = bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU")
    _add_client_flags(p, "--api-model", "endpoint model name when answering from --base-url")
    p.set_defaults(func=cmd_answer)


def _add_judge(p) -> None:
    p.add_argument("--questions", default="vicuna_80", help="question file or bundled set")
    p.add_argument("--answers", nargs="+", required=True, help="answer files; pairwise: exactly two "
                                                                "(model_1 = first)")
    p.add_argument("--mode", choices=["pairwise", "single"], default="pairwise")
    p.add_argument("--out", required=True, help="judgment JSONL (appended; one comparison per file)")
    p.add_argument("--no-swap", action="store_true", help="pairwise: judge only with model_1 shown first")
    p.add_argument("--max-tokens", type=int, default=1024, help="judge reply length")
    p.add_argument("--temperature", type=float, default=0.0)
    _add_client_flags(p, "--model", "judge model name (default: $DS_VICUNA_JUDGE_MODEL)")
    p.set_defaults(func=cmd_judge)


def _add_summarize(p) -> None:
    p.add_argument("files", nargs="+", help="judgment files (ours, or FastChat review_<m1>_<m2>.jsonl)")
    p.add_argument("--json", action="store_true", help="print a JSON list, one object per file in input order")
    p.add_argument("--questions", help="question file naming categories for legacy review files")
    p.set_defaults(func=cmd_summarize)


def _add_plot(p) -> None:
    p.add_argument("inputs", nargs="+", help="summary JSON from `eval summarize --json`, or judgment files")
    p.add_argument("--out-dir", default="plots", help="where the PNGs go")
    p.set_defaults(func=cmd_plot)


def _client(args):
    from ds_vicuna.eval.judge_client import ChatClient, RetryPolicy

    retry = RetryPolicy(max_attempts=args.max_attempts, base_wait=args.backoff)
    return ChatClient.from_env(args.base_url, args.api_model, args.api_key, timeout=args.timeout, retry=retry)


def cmd_answer(args) -> int:
    from ds_vicuna.eval.answer import ApiBackend, LocalBackend, run_answers
    from ds_vicuna.eval.questions import load_questions

    questions = load_questions(args.questions)
    if args.model:
        try:
            backend = LocalBackend(args.model, max_new_tokens=args.max_tokens, temperature=args.temperature,
                                   device=args.device, dtype=args.dtype)
        except (FileNotFoundError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        model_id, chunk = args.model_id or _local_model_id(args.model), args.batch_size
    else:
        if not args.api_model:
            print("error: give --model (a local checkpoint or 'embedded') or --api-model with --base-url",
                  file=sys.stderr)
            return 2
        client = _client(args)
        backend = ApiBackend(client, args.max_tokens, args.temperature, args.workers)
        model_id, chunk = args.model_id or client.model, max(args.batch_size, 4 * args.workers)
    stats = run_answers(questions, backend, args.out, model_id, chunk_size=chunk, progress=not args.quiet)
    print(f"answers -> {args.out}: {stats.written} written, {stats.skipped} already there, {stats.failed} failed")
    return 1 if stats.failed else 0


def _local_model_id(model: str) -> str:
    from pathlib import Path

    from ds_vicuna.models import EMBEDDED_MODEL

    return EMBEDDED_MODEL if model == "embedded" else Path(model).resolve().name


def cmd_judge(args) -> int:
    from ds_vicuna.eval.answer import load_answers
    from ds_vicuna.eval.judge import plan_tasks, run_judge
    from ds_vicuna.eval.judge_prompts import JudgeMode
    from ds_vicuna.eval.questions import load_questions

    questions = load_questions(args.questions)
    answers = [load_answers(path) for path in args.answers]
    tasks, missing = plan_tasks(questions, answers, JudgeMode(args.mode), swap=not args.no_swap)
    if missing:
        print(f"warning: {missing} questions left out: some answer file lacks them", file=sys.stderr)
    stats = run_judge(tasks, _client(args), args.out, workers=args.workers, max_tokens=args.max_tokens,
                      temperature=args.temperature, progress=not args.quiet)
    print(f"judgments -> {args.out}: {stats.written} written ({stats.unparsed} unparsed), "
          f"{stats.skipped} already there, {stats.failed} failed after retries")
    if stats.failed:
        print("rerun the same command to retry the failed judgments", file=sys.stderr)
    return 1 if stats.failed else 0


def cmd_summarize(args) -> int:
    from ds_vicuna.eval.summarize import dumps, format_table, summarize_files

    categories = None
    if args.questions:
        from ds_vicuna.eval.questions import load_questions

        categories = {q.question_id: q.category for q in load_questions(args.questions)}
    summaries = summarize_files(args.files, categories)
    print(dumps(summaries) if args.json else format_table(summaries))
    return 0


def cmd_plot(args) -> int:
    from ds_vicuna.eval.plot import load_summaries, plot_all

    for path in plot_all(load_summaries(args.inputs), args.out_dir):
        print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point for `python -m ds_vicuna.eval.cli <answer|judge|summarize|plot> ...`."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="ds-vicuna")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
