"""`ds-vicuna eval answer`: answers to a question set, from a local checkpoint or an OpenAI-compatible endpoint.

    ds-vicuna eval answer --questions vicuna_80 --model embedded --out answers/smollm2.jsonl
    ds-vicuna eval answer --questions vicuna_80 --base-url http://127.0.0.1:8000/v1 --api-model my-model \
        --workers 8 --out answers/my-model.jsonl

Output is FastChat's answer format, one record per question, appended and flushed as each question finishes:
`{"question_id", "answer_id", "model_id", "text"}` for a single-turn question, `choices: [{"index": 0,
"turns": [...]}]` for a multi-turn one. Questions already in the output file are skipped, so an interrupted
run is resumed by running it again. Multi-turn questions are answered turn by turn, each reply fed back.
"""
from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

from ds_vicuna.eval.judge_client import ChatClient, map_concurrent
from ds_vicuna.eval.questions import Question
from ds_vicuna.eval.records import AppendWriter, RecordError, iter_jsonl

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Answer:
    question_id: int | str
    model_id: str
    turns: tuple[str, ...]


@dataclass
class AnswerStats:
    written: int = 0
    skipped: int = 0
    """Already in the output file (resume)."""
    failed: int = 0
    """Not written because generation failed; a rerun retries them."""


class AnswerBackend(Protocol):
    def generate(self, conversations: Sequence[list[dict]]) -> list[str | None]:
        """One reply per conversation (each ends with the user's turn); None where generation failed."""


def load_answers(path: str | Path) -> dict[int | str, Answer]:
    """Read a FastChat answer file (`text` or `choices[0].turns`) keyed by question_id.

    Raises:
        RecordError: a record without a question_id, model_id or answer text, or a duplicate id; names file:line.
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
        answers[qid] = Answer(qid, model_id, _answer_turns(record, where))
    return answers


def _answer_turns(record: dict, where: str) -> tuple[str, ...]:
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


def answer_record(question: Question, model_id: str, turns: list[str]) -> dict:
    """The FastChat answer record for one question."""
    record = {"question_id": question.question_id, "answer_id": uuid.uuid4().hex, "model_id": model_id}
    if question.multi_turn:
        record["choices"] = [{"index": 0, "turns": turns}]
    else:
        record["text"] = turns[0]
    record["tstamp"] = round(time.time(), 3)
    return record


def run_answers(questions: Sequence[Question], backend: AnswerBackend, out_path: str | Path, model_id: str,
                chunk_size: int = 8, progress: bool = True) -> AnswerStats:
    """Answer every question not yet in `out_path`, `chunk_size` questions per backend call, turn by turn."""
    done = set(load_answers(out_path)) if Path(out_path).is_file() else set()
    pending = [q for q in questions if q.question_id not in done]
    pending.sort(key=lambda q: len(q.turns[0]))  # similar lengths per batch: less padding
    stats = AnswerStats(skipped=len(questions) - len(pending))
    from tqdm import tqdm

    bar = tqdm(total=len(pending), desc=f"answer {model_id}", unit="q", disable=not progress)
    with AppendWriter(out_path) as writer:
        for start in range(0, len(pending), chunk_size):
            chunk = pending[start:start + chunk_size]
            for question, turns in zip(chunk, _answer_chunk(chunk, backend)):
                if turns is None:
                    stats.failed += 1
                    continue
                writer.write(answer_record(question, model_id, turns))
                stats.written += 1
            bar.update(len(chunk))
    bar.close()
    return stats


def _answer_chunk(chunk: list[Question], backend: AnswerBackend) -> list[list[str] | None]:
    """Turn t of every question that has it, in one backend call per turn; None marks a failed question."""
    replies: list[list[str] | None] = [[] for _ in chunk]
    for turn in range(max(len(q.turns) for q in chunk)):
        active = [i for i, q in enumerate(chunk) if len(q.turns) > turn and replies[i] is not None]
        if not active:
            break
        conversations = [_conversation(chunk[i], replies[i], turn) for i in active]
        for i, text in zip(active, backend.generate(conversations)):
            if text is None:
                replies[i] = None
            else:
                replies[i].append(text)
    return replies


def _conversation(question: Question, replies: list[str], turn: int) -> list[dict]:
    messages = []
    for asked, reply in zip(question.turns[:turn], replies):
        messages += [{"role": "user", "content": asked}, {"role": "assistant", "content": reply}]
    return messages + [{"role": "user", "content": question.turns[turn]}]


@dataclass
class ApiBackend:
    """Replies from an OpenAI-compatible endpoint, `workers` requests in flight."""

    client: ChatClient
    max_tokens: int = 1024
    temperature: float = 0.7
    workers: int = 4

    def generate(self, conversations: Sequence[list[dict]]) -> list[str | None]:
        def call(index: int) -> str:
            return self.client.complete(conversations[index], max_tokens=self.max_tokens,
                                        temperature=self.temperature)

        out: list[str | None] = [None] * len(conversations)
        for index, text, error in map_concurrent(call, range(len(conversations)), self.workers):
            if error is not None:
                log.warning("answer failed (will be retried on the next run): %s", error)
            out[index] = text
        return out


class LocalBackend:
    """Replies from a local Hugging Face checkpoint (or `embedded`), batched the way the serving worker batches.

    The model is loaded by `ds_vicuna.chat_model.load_chat_model` (template, stops and context length from the
    checkpoint's `ds_vicuna.json`) and replies come from the worker's own engine
    (`ds_vicuna.serve.engine.generate_replies`), so a local answer is what the served model would answer.
    """

    def __init__(self, model: str, max_new_tokens: int = 512, temperature: float = 0.0, device: str | None = None,
                 dtype: str = "auto"):
        from ds_vicuna.chat_model import load_chat_model

        self.chat = load_chat_model(model, device=device or "auto", dtype=dtype)
        self.max_new_tokens, self.temperature = max_new_tokens, temperature

    def generate(self, conversations: Sequence[list[dict]]) -> list[str | None]:
        from ds_vicuna.serve.engine import generate_replies

        replies = generate_replies(self.chat, conversations, self.max_new_tokens, self.temperature)
        return [None if reply is None else reply.strip() for reply in replies]  # FastChat strips answers too
