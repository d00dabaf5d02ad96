"""`ds-vicuna eval judge`: LLM-as-a-judge over answer files, written in FastChat's `model_judgment` layout.

    ds-vicuna eval judge --questions mt_bench --answers answers/a.jsonl answers/b.jsonl --mode pairwise \
        --out model_judgment/gpt-4_pair.jsonl --base-url http://127.0.0.1:8000/v1 --model gpt-4
    ds-vicuna eval judge --questions mt_bench --answers answers/*.jsonl --mode single \
        --out model_judgment/gpt-4_single.jsonl ...

Which prompt judges what: `judge_prompts.PromptSet.select` (FastChat's routing). Turn 1 of every question is
judged; turn 2 of every two-turn question, with the multi-turn prompt. Pairwise: every (question, turn) of a
pair is judged twice, once with each model shown first (game 1: model_1 is A; game 2: model_2 is A), against
position bias; `--no-swap` plays game 1 only. With more than two answer files every pair is judged, or every
model against `--baseline`.

One record per (question, turn, pair) or (question, turn, model), with FastChat's fields, so its
`show_result.py` and `common.load_*_model_judgments` read our files:
- pairwise: `question_id, model_1, model_2, g1_winner, g2_winner` ("model_1" | "model_2" | "tie" | "error"),
  `judge: [judge model, prompt name], g1_user_prompt, g1_judgment, g2_user_prompt, g2_judgment, turn, tstamp`;
- single: `question_id, model, judge, user_prompt, judgment, score, turn, tstamp` (`score` null when the
  grade cannot be read; FastChat wrote -1);
plus ours: `key`, `mode`, `category`, `games` (pairwise: 2, or 1 with `--no-swap`, when FastChat's convention
`g2_winner = g1_winner` holds), `g1_scores`/`g2_scores` (the two scores as shown, for score prompts),
`failure(s)` (why a judgment has no verdict), and `answer_length(s)` (characters of the judged answers, for
length statistics).

Records are appended and flushed one by one, keyed by `key` = mode|question_id|turn|models. A rerun skips keys
already present, so a killed run resumes with no duplicates and no losses. A judgment that cannot be parsed is
still written (raw text kept, winner "error" / score null, failure reason) and is not re-asked; a request that
fails for good (retries exhausted) writes nothing, is counted, and is retried by the next run.
"""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ds_vicuna.eval.answer_files import Answer
from ds_vicuna.eval.judge_client import ChatClient, map_concurrent
from ds_vicuna.eval.judge_prompts import JudgeMode, JudgePrompt, PromptSet
from ds_vicuna.eval.questions import Question
from ds_vicuna.data.jsonl import AppendWriter, iter_jsonl

log = logging.getLogger(__name__)
WINNER_OF_GAME = ({"A": "model_1", "B": "model_2", "tie": "tie"},  # game 1: model_1 shown as A
                  {"A": "model_2", "B": "model_1", "tie": "tie"})  # game 2: model_2 shown as A
ERROR = "error"


@dataclass(frozen=True)
class JudgeTask:
    key: str
    mode: JudgeMode
    question: Question
    turn: int
    prompt: JudgePrompt
    models: tuple[str, ...]
    """(model_1, model_2) in pairwise mode, (model,) in single mode."""
    answers: tuple[tuple[str, ...], ...]
    """Turns of each model's answer, aligned with `models`."""
    swap: bool = True
    """Pairwise: also play game 2 (model_2 shown first)."""


@dataclass
class JudgePlan:
    tasks: list[JudgeTask] = field(default_factory=list)
    missing_answers: list = field(default_factory=list)
    """Question ids left out because some model has no (complete) answer."""
    no_prompt: list = field(default_factory=list)
    """(question_id, turn) that no prompt of the set judges (a third turn; turn 2 without a multi-turn prompt)."""
    missing_reference: list = field(default_factory=list)
    """(question_id, turn) in a reference category judged without a reference (general prompt)."""

    def warnings(self) -> list[str]:
        out = []
        if self.missing_answers:
            out.append(f"{len(self.missing_answers)} questions left out: some answer file lacks them "
                       f"(ids {_ids(self.missing_answers)})")
        if self.no_prompt:
            out.append(f"{len(self.no_prompt)} question turns not judged: no prompt of the set judges them "
                       f"(question, turn: {_ids(self.no_prompt)})")
        if self.missing_reference:
            out.append(f"{len(self.missing_reference)} question turns in a reference category (math, reasoning, "
                       f"coding) judged WITHOUT a reference answer, by the general prompt; pass "
                       f"--reference-answers to grade them as MT-bench does ({_ids(self.missing_reference)})")
        return out


def _ids(values: list) -> str:
    shown = ", ".join(map(str, values[:8]))
    return shown + (f", ... {len(values) - 8} more" if len(values) > 8 else "")


@dataclass
class JudgeStats:
    written: int = 0
    skipped: int = 0
    """Already judged in the output file (resume)."""
    failed: int = 0
    """API failures after every retry; nothing written, the next run retries them."""
    unparsed: int = 0
    """Judgments (games) written whose verdict or grade could not be read."""


def task_key(mode: JudgeMode, question_id, turn: int, models: Sequence[str]) -> str:
    return "|".join([mode.value, str(question_id), str(turn), *models])


def model_pairs(model_ids: Sequence[str], baseline: str | None = None) -> list[tuple[int, int]]:
    """Index pairs to judge: every pair in file order, or (baseline, other) for each other model.

    Raises:
        ValueError: a baseline that is not among the models.
    """
    if baseline is None:
        return list(itertools.combinations(range(len(model_ids)), 2))
    if baseline not in model_ids:
        raise ValueError(f"baseline {baseline!r} is not among the answer files' models {list(model_ids)}")
    b = list(model_ids).index(baseline)
    return [(b, i) for i in range(len(model_ids)) if i != b]


def plan_tasks(questions: Sequence[Question], answers: Sequence[dict[object, Answer]], mode: JudgeMode,
               prompts: PromptSet, *, swap: bool = True, baseline: str | None = None) -> JudgePlan:
    """Every judgment to make, and what was left out and why.

    Raises:
        ValueError: pairwise mode with fewer than two answer sets, two sets from the same model, or a file
            holding several models.
    """
    model_ids = [_model_of(a) for a in answers]
    if len(set(model_ids)) != len(model_ids):
        raise ValueError(f"answer files must come from different models, got {model_ids}")
    if mode is JudgeMode.PAIRWISE and len(answers) < 2:
        raise ValueError(f"pairwise mode compares two or more answer files, got {len(answers)}")
    groups = [(i,) for i in range(len(answers))] if mode is JudgeMode.SINGLE else model_pairs(model_ids, baseline)
    plan = JudgePlan()
    for question in questions:
        found = [a.get(question.question_id) for a in answers]
        if any(a is None or len(a.turns) < len(question.turns) for a in found):
            plan.missing_answers.append(question.question_id)
            continue
        for turn in range(1, len(question.turns) + 1):
            chosen = prompts.select(mode, question, turn)
            if chosen.prompt is None:
                plan.no_prompt.append((question.question_id, turn))
                continue
            if chosen.missing_reference:
                plan.missing_reference.append((question.question_id, turn))
            for group in groups:
                models = tuple(model_ids[i] for i in group)
                plan.tasks.append(JudgeTask(task_key(mode, question.question_id, turn, models), mode, question,
                                            turn, chosen.prompt, models, tuple(found[i].turns for i in group),
                                            swap))
    return plan


def _model_of(answers: dict[object, Answer]) -> str:
    ids = {a.model_id for a in answers.values()}
    if len(ids) != 1:
        raise ValueError(f"an answer file must hold one model's answers, found model_ids {sorted(ids)}")
    return ids.pop()


def judge_one(task: JudgeTask, client: ChatClient, max_tokens: int = 1024, temperature: float = 0.0) -> dict:
    """Ask the judge about one task (both games in pairwise mode) and return its record."""
    if task.mode is JudgeMode.SINGLE:
        record = _single_record(task, client, max_tokens, temperature)
    else:
        record = _pair_record(task, client, max_tokens, temperature)
    record.update(turn=task.turn, tstamp=round(time.time(), 3), key=task.key, mode=task.mode.value,
                  category=task.question.category)
    return record


def _single_record(task: JudgeTask, client: ChatClient, max_tokens: int, temperature: float) -> dict:
    messages = task.prompt.render(task.question, task.answers, task.turn)
    text = client.complete(messages, max_tokens=max_tokens, temperature=temperature)
    grade = task.prompt.parse(text)
    return {"question_id": task.question.question_id, "model": task.models[0],
            "judge": [client.model, task.prompt.name], "user_prompt": messages[-1]["content"], "judgment": text,
            "score": grade.score, "failure": grade.failure.value if grade.failure else None,
            "answer_length": len(task.answers[0][task.turn - 1])}


def _pair_record(task: JudgeTask, client: ChatClient, max_tokens: int, temperature: float) -> dict:
    games = [_play(task, client, shown, max_tokens, temperature)
             for shown in ((0, 1), (1, 0))[:2 if task.swap else 1]]
    winners = [WINNER_OF_GAME[g].get(verdict.winner, ERROR) if verdict.parsed else ERROR
               for g, (_, _, verdict) in enumerate(games)]
    record = {"question_id": task.question.question_id, "model_1": task.models[0], "model_2": task.models[1],
              # one game: FastChat's own convention for a single judgment (g2_winner = g1_winner)
              "g1_winner": winners[0], "g2_winner": winners[-1], "judge": [client.model, task.prompt.name]}
    for g in (0, 1):
        prompt, text, _ = games[g] if g < len(games) else (None, None, None)
        record.update({f"g{g + 1}_user_prompt": prompt, f"g{g + 1}_judgment": text})
    record.update(games=len(games), g1_scores=_scores(games[0][2]),
                  g2_scores=_scores(games[1][2]) if len(games) > 1 else None,
                  failures=[verdict.failure.value if verdict.failure else None for _, _, verdict in games],
                  answer_lengths=[len(a[task.turn - 1]) for a in task.answers])
    return record


def _play(task: JudgeTask, client: ChatClient, shown: tuple[int, int], max_tokens: int, temperature: float):
    """One game: the answers in `shown` order as A and B; returns (user prompt, judge text, verdict)."""
    messages = task.prompt.render(task.question, [task.answers[i] for i in shown], task.turn)
    text = client.complete(messages, max_tokens=max_tokens, temperature=temperature)
    return messages[-1]["content"], text, task.prompt.parse(text)


def _scores(verdict) -> list[float] | None:
    return [verdict.score_a, verdict.score_b] if verdict.parsed and verdict.score_a is not None else None


def record_unparsed(record: dict) -> int:
    """How many judgments (games) of one record have no verdict or grade."""
    if record["mode"] == JudgeMode.SINGLE.value:
        return int(record.get("score") is None)
    return sum(w == ERROR for w in (record["g1_winner"], record["g2_winner"])[:record.get("games", 2)])


def existing_keys(out_path: str | Path, mode: JudgeMode) -> set[str]:
    """Keys already judged in `out_path`.

    Raises:
        ValueError: the file holds records of another mode or not written by `eval judge` (FastChat's own
            files, our older one-record-per-order files): write to another --out file.
    """
    path = Path(out_path)
    if not path.is_file():
        return set()
    keys = set()
    for line, record in iter_jsonl(path, allow_torn_tail=True):
        if record.get("mode") != mode.value or "key" not in record or "order" in record:
            kind = f"a {record['mode']} judgment" if "mode" in record and "order" not in record \
                else "a record in another layout"
            raise ValueError(f"{path}:{line}: holds {kind}; write this {mode.value} run to another --out file")
        keys.add(record["key"])
    return keys


def run_judge(tasks: Sequence[JudgeTask], client: ChatClient, out_path: str | Path, *, workers: int = 4,
              max_tokens: int = 1024, temperature: float = 0.0, progress: bool = True) -> JudgeStats:
    """Judge every task not yet in `out_path`, `workers` tasks in flight, one flushed record each."""
    if not tasks:
        return JudgeStats()
    done = existing_keys(out_path, tasks[0].mode)
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
            stats.unparsed += record_unparsed(record)
    return stats
