"""Answer files in FastChat's `model_answer` format, read and written in one place.

    {"question_id": 81, "answer_id": "...", "model_id": "vicuna-13b",
     "choices": [{"index": 0, "turns": ["...", "..."]}], "tstamp": 1686286924.8}

Written: always `choices[0].turns`, one string per question turn (FastChat's `gen_judgment.py` reads
`answer["choices"][0]["turns"][i]`). Read: that, or the older single-turn form `{"text": "..."}` that ds-vicuna
wrote before and Vicuna's March-2023 answer tables used. FastChat's reference answers
(`reference_answer/gpt-4.jsonl`) are answer files too.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ds_vicuna.data.jsonl import RecordError, iter_jsonl


@dataclass(frozen=True)
class Answer:
    question_id: int | str
    model_id: str
    turns: tuple[str, ...]


def load_answers(path: str | Path) -> dict[int | str, Answer]:
    """Read an answer file keyed by question_id.

    Raises:
        RecordError: a record without a question_id, model_id or answer turns, or a duplicate id; names file:line.
    """
    answers: dict = {}
    for line, record in iter_jsonl(path, allow_torn_tail=True):
        where = f"{path}:{line}"
        qid = record.get("question_id")
        if isinstance(qid, bool) or not isinstance(qid, (int, str)):
            raise RecordError(f"{where}:question_id: expected an integer or string, got {qid!r}")
        model_id = record.get("model_id")
        if not isinstance(model_id, str) or not model_id:
            raise RecordError(f"{where}:model_id: expected a non-empty string, got {model_id!r}")
        if qid in answers:
            raise RecordError(f"{where}:question_id: duplicate answer for {qid!r}")
        answers[qid] = Answer(qid, model_id, answer_turns(record, where))
    return answers


def answer_turns(record: dict, where: str) -> tuple[str, ...]:
    """The turns of one answer record (`choices[0].turns`, or the older `text`); `where` prefixes errors."""
    if "choices" in record:
        try:
            turns = record["choices"][0]["turns"]
        except (TypeError, KeyError, IndexError):
            raise RecordError(f"{where}:choices: expected [{{\"index\": 0, \"turns\": [...]}}]") from None
        if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
            raise RecordError(f"{where}:choices[0].turns: expected a list of strings")
        return tuple(turns)
    if not isinstance(record.get("text"), str):
        raise RecordError(f"{where}:text: expected the answer text (or choices[0].turns)")
    return (record["text"],)


def answer_record(question_id: int | str, model_id: str, turns: Sequence[str]) -> dict:
    """The FastChat answer record for one question (always `choices[0].turns`)."""
    return {"question_id": question_id, "answer_id": uuid.uuid4().hex, "model_id": model_id,
            "choices": [{"index": 0, "turns": list(turns)}], "tstamp": round(time.time(), 3)}
