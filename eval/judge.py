"""`ds-vicuna eval judge`: LLM-as-a-judge over answer files, one JSONL record per judgment.

    ds-vicuna eval judge --questions vicuna_80 --answers answers/gpt35.jsonl answers/ours.jsonl \
        --mode pairwise --out judgments/gpt35_vs_ours.jsonl --base-url http://127.0.0.1:8000/v1 --model judge
    ds-vicuna eval judge --questions mt_bench_mini --answers answers/a.jsonl answers/b.jsonl --mode single ...

Pairwise: every (question, turn) is judged twice, once with each model shown as Assistant 1 (`order` "12" and
"21"), against position bias; `--no-swap` judges order "12" only. Stored `score_1`/`score_2` are always the
scores of `model_1`/`model_2` (the first and second answer file), whatever the order shown. Single: every model's
answer is graded alone per turn (reference-guided for math questions that carry a reference).

Records are appended and flushed one by one, keyed by `key` = mode|question_id|turn|models|order. A rerun skips
keys already present, so a killed run resumes with no duplicates and no losses. A judgment whose scores cannot be
parsed is still written (raw `text`, `parsed: false`, `failure` reason) and is not re-asked; a request that
fails for good (retries exhausted) writes nothing, is counted, and is retried by the next run.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ds_vicuna.eval.answer import Answer
from ds_vicuna.eval.judge_client import ChatClient, map_concurrent
from ds_vicuna.eval.judge_prompts import JudgeMode, build_pairwise_prompt, build_single_prompt
from ds_vicuna.eval.questions import Question
from ds_vicuna.eval.records import AppendWriter, iter_jsonl
from ds_vicuna.eval.score_parsing import parse_pair_scores, parse_single_score

log = logging.getLogger(__name__)
ORDERS = ("12", "21")  # "12": model_1 shown as Assistant 1; "21": model_2 shown as Assistant 1


@dataclass(frozen=True)
class JudgeTask:
    key: str
    mode: JudgeMode
    question: Question
    turn: int
    models: tuple[str, ...]
    """(model_1, model_2) in pairwise mode, (model,) in single mode."""
    answers: tuple[tuple[str, ...], ...]
    """Turns of each model's answer, aligned with `models`."""
    order: str | None = None


@dataclass
class JudgeStats:
    written: int = 0
    skipped: int = 0
    """Already judged in the output file (resume)."""
    failed: int = 0
    """API failures after every retry; nothing written, the next run retries them."""
    unparsed: int = 0
    """Written judgments whose scores could not be read."""
    missing_answers: int = 0
    """Questions left out because a model has no answer for them."""


def task_key(mode: JudgeMode, question_id, turn: int, models: Sequence[str], order: str | None) -> str:
    return "|".join([mode.value, str(question_id), str(turn), *models, order or "-"])


def plan_tasks(questions: Sequence[Question], answers: Sequence[dict[object, Answer]], mode: JudgeMode,
               swap: bool = True) -> tuple[list[JudgeTask], int]:
    """Every judgment to make, and the number of questions lacking some model's answer.

    Raises:
        ValueError: pairwise mode without exactly two answer sets, or two sets from the same model.
    """
    model_ids = [_model_of(a) for a in answers]
    if mode is JudgeMode.PAIRWISE and len(answers) != 2:
        raise ValueError(f"pairwise mode compares exactly two answer files, got {len(answers)}")
    if len(set(model_ids)) != len(model_ids):
        raise ValueError(f"answer files must come from different models, got {model_ids}")
    tasks, missing = [], 0
    for question in questions:
        found = [a.get(question.question_id) for a in answers]
        if any(a is None or len(a.turns) < len(question.turns) for a in found):
            missing += 1
            continue
        for turn in range(1, len(question.turns) + 1):
            tasks += _tasks_for(mode, question, turn, model_ids, [a.turns for a in found], swap)
    return tasks, missing


def _tasks_for(mode, question, turn, models, turns, swap) -> list[JudgeTask]:
    if mode is JudgeMode.SINGLE:
        return [JudgeTask(task_key(mode, question.question_id, turn, [m], None), mode, question, turn, (m,), (t,))
                for m, t in zip(models, turns)]
    return [JudgeTask(task_key(mode, question.question_id, turn, models, order), mode, question, turn,
                      tuple(models), tuple(turns), order) for order in (ORDERS if swap else ORDERS[:1])]


def _model_of(answers: dict[object, Answer]) -> str:
    ids = {a.model_id for a in answers.values()}
    if len(ids) != 1:
        raise ValueError(f"an answer file must hold one model's answers, found model_ids {sorted(ids)}")
    return ids.pop()


def judge_one(task: JudgeTask, client: ChatClient, max_tokens: int = 1024, temperature: float = 0.0) -> dict:
    """Ask the judge about one task and return its record (scores parsed, or `parsed: false`)."""
    question = task.question
    if task.mode is JudgeMode.SINGLE:
        prompt = build_single_prompt(question, list(task.answers[0]), task.turn)
    else:
        shown = task.answers if task.order == "12" else task.answers[::-1]
        prompt = build_pairwise_prompt(question, list(shown[0]), list(shown[1]), task.turn)
    text = client.complete(prompt.messages, max_tokens=max_tokens, temperature=temperature)
    record = {"key": task.key, "mode": task.mode.value, "question_id": question.question_id,
              "category": question.category, "turn": task.turn}
    if task.mode is JudgeMode.SINGLE:
        result = parse_single_score(text)
        record.update(model=task.models[0], score=result.score)
    else:
        result = parse_pair_scores(text)
        first, second = (result.score_1, result.score_2) if task.order == "12" else (result.score_2, result.score_1)
        record.update(model_1=task.models[0], model_2=task.models[1], order=task.order,
                      score_1=first, score_2=second)
    record.update(parsed=result.parsed, failure=result.failure.value if result.failure else None,
                  judge=client.model, prompt=prompt.name, text=text, tstamp=round(time.time(), 3))
    return record


def existing_keys(out_path: str | Path, mode: JudgeMode, models: Sequence[str]) -> set[str]:
    """Keys already judged in `out_path`.

    Raises:
        ValueError: the file holds judgments of another mode or model set (one file per comparison).
    """
    path = Path(out_path)
    if not path.is_file():
        return set()
    keys = set()
    for line, record in iter_jsonl(path, allow_torn_tail=True):
        theirs = [record.get("model_1"), record.get("model_2")] if record.get("mode") == "pairwise" \
            else [record.get("model")]
        same = theirs == list(models) if mode is JudgeMode.PAIRWISE else theirs[0] in models
        if record.get("mode") != mode.value or not same:
            raise ValueError(f"{path}:{line}: holds a {record.get('mode')} judgment of {theirs}; "
                             f"write this {mode.value} run of {list(models)} to another --out file")
        keys.add(record["key"])
    return keys


def run_judge(tasks: Sequence[JudgeTask], client: ChatClient, out_path: str | Path, *, workers: int = 4,
              max_tokens: int = 1024, temperature: float = 0.0, progress: bool = True) -> JudgeStats:
    """Judge every task not yet in `out_path`, `workers` requests in flight, one flushed record each."""
    if not tasks:
        return JudgeStats()
    mode = tasks[0].mode
    models = tasks[0].models if mode is JudgeMode.PAIRWISE else sorted({t.models[0] for t in tasks})
    done = existing_keys(out_path, mode, models)
    pending = [t for t in tasks if t.key not in done]
    stats = JudgeStats(skipped=len(tasks) - len(pending))
    from tqdm import tqdm

    with AppendWriter(out_path) as writer, tqdm(total=len(pending), desc="judge", unit="judgment",
                                               disable=not progress) as bar:
        for task, record, error in map_concurrent(
                lambda t: judge_one(t, client, max_tokens, temperature), pending, workers):
            bar.update(1)
            if error is not None:
                stats.failed += 1
                log.warning("judgment %s failed (the next run retries it): %s", task.key, error)
                continue
            writer.write(record)
            stats.written += 1
            stats.unparsed += not record["parsed"]
    return stats

