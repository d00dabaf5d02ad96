"""`ds-vicuna eval run`: the whole loop the Vicuna team ran, on served models, into one folder.

    ds-vicuna eval run --questions mt_bench --out runs/eval-1 \
        --models http://10.0.0.5:8000/v1=vicuna-7b http://10.0.0.6:8000/v1=ours-step-300 \
        --judge https://api.openai.com/v1=gpt-4

Each `URL=name` is an OpenAI-compatible endpoint and the model name it serves (also the model's name in every
file). The folder then holds, in FastChat's `data/<bench>/` layout where one exists:

    model_answer/<name>.jsonl            answers (FastChat format), one file per model
    model_judgment/<judge>_single.jsonl  single-answer grades (MT-bench scores)
    model_judgment/<judge>_pair.jsonl    pairwise judgments, both answer orders
    summary.json                         `eval summarize --json` of both judgment files
    ratings.json                         `eval rate --json` (Bradley-Terry, bootstrap intervals)
    relative_quality.json                Figure 1 numbers (every model as a % of --reference)
    plots/*.png                          relative quality, win/tie/loss, categories, ratings
    report.md                            all of the above in one page

Every stage appends and skips what is already there, so rerunning the same command after a failure or a kill
resumes it; the command exits 1 while any answer or judgment is still missing (the report says which).
"""
from __future__ import annotations

from pathlib import Path

from ds_vicuna.eval.judge_client import ChatClient
from ds_vicuna.eval.report import write_outputs
from ds_vicuna.eval.run_settings import Endpoint, RunResult, RunSettings, safe_name


def run_eval(settings: RunSettings) -> RunResult:
    """Answers, judgments, summary, ratings, plots and report for `settings` (module docstring)."""
    from ds_vicuna.eval.questions import load_for_judging

    out = Path(settings.out_dir)
    result = RunResult(out)
    questions, result.references = load_for_judging(settings.questions, settings.reference_answers,
                                                     settings.inline_references)
    answer_files = _answer_all(settings, questions, out / "model_answer", result)
    judgment_files = _judge_all(settings, questions, answer_files, out / "model_judgment", result)
    write_outputs(settings, questions, answer_files, judgment_files, result)
    return result


def _client(settings: RunSettings, endpoint: Endpoint) -> ChatClient:
    return ChatClient(endpoint.base_url, endpoint.model, settings.api_key, timeout=settings.timeout,
                      retry=settings.retry)


def _answer_all(settings: RunSettings, questions, folder: Path, result: RunResult) -> dict[str, Path]:
    from ds_vicuna.eval.answer import ApiBackend, fastchat_temperature, run_answers

    files = {}
    per_category = fastchat_temperature if settings.temperature is None else None
    for endpoint in settings.models:
        path = folder / f"{safe_name(endpoint.model)}.jsonl"
        backend = ApiBackend(_client(settings, endpoint), settings.max_tokens, settings.temperature or 0.0,
                             settings.workers)
        stats = run_answers(questions, backend, path, endpoint.model, chunk_size=4 * settings.workers,
                            progress=settings.progress, temperature_of=per_category)
        result.answers_failed[endpoint.model] = stats.failed
        files[endpoint.model] = path
    return files


def _judge_all(settings: RunSettings, questions, answer_files: dict[str, Path], folder: Path,
               result: RunResult) -> list[Path]:
    from ds_vicuna.eval.answer_files import load_answers
    from ds_vicuna.eval.judge import plan_tasks, run_judge
    from ds_vicuna.eval.judge_prompts import JudgeMode, default_prompt_set, load_prompt_set

    answers = [load_answers(p) for p in answer_files.values() if p.is_file()]
    if len(answers) < len(answer_files):
        result.warnings.append("some models wrote no answers at all; they are left out of judging")
    modes = [JudgeMode.SINGLE, JudgeMode.PAIRWISE] if settings.mode == "both" else [JudgeMode(settings.mode)]
    client = _client(settings, settings.judge)
    files = []
    for mode in modes:
        if mode is JudgeMode.PAIRWISE and len(answers) < 2:
            continue
        prompts = load_prompt_set(settings.judge_prompts or default_prompt_set(mode, questions))
        plan = plan_tasks(questions, answers, mode, prompts, baseline=settings.baseline)
        result.warnings += [f"{mode.value} judging: {w}" for w in plan.warnings()]
        path = folder / f"{safe_name(settings.judge.model)}_{'single' if mode is JudgeMode.SINGLE else 'pair'}.jsonl"
        stats = run_judge(plan.tasks, client, path, workers=settings.workers,
                          max_tokens=settings.judge_max_tokens, progress=settings.progress)
        result.judgments_failed[mode.value] = stats.failed
        if path.is_file():
            files.append(path)
    return files
