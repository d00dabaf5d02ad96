"""`ds-vicuna eval answer`: answers to a question set, from a local checkpoint or an OpenAI-compatible endpoint.

    ds-vicuna eval answer --questions vicuna_80 --model embedded --out answers/smollm2.jsonl
    ds-vicuna eval answer --questions vicuna_80 --base-url http://127.0.0.1:8000/v1 --api-model my-model \
        --workers 8 --out answers/my-model.jsonl

Output is FastChat's answer format (`eval/answer_files.py`), one record per question, appended and flushed as
each question finishes: `{"question_id", "answer_id", "model_id", "choices": [{"index": 0, "turns": [...]}],
"tstamp"}`, one turn per question turn, single-turn questions included. Questions already in the output file
are skipped, so an interrupted run is resumed by running it again. Multi-turn questions are answered turn by
turn, each reply fed back.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence

from ds_vicuna.eval.answer_files import answer_record, load_answers
from ds_vicuna.eval.judge_client import ChatClient, map_concurrent
from ds_vicuna.eval.questions import Question
from ds_vicuna.data.jsonl import AppendWriter

DEFAULT_ANSWER_TOKENS = 1024  # FastChat's gen_model_answer.py --max-new-token, for MT-bench and Vicuna-bench

log = logging.getLogger(__name__)


@dataclass
class AnswerStats:
    written: int = 0
    skipped: int = 0
    """Already in the output file (resume)."""
    failed: int = 0
    """Not written because generation failed; a rerun retries them."""


# FastChat's `temperature_config` (llm_judge/common.py): MT-bench answers are sampled per category.
FASTCHAT_TEMPERATURES = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
                         "reasoning": 0.0, "stem": 0.1, "humanities": 0.1, "arena-hard-200": 0.0}
FASTCHAT_DEFAULT_TEMPERATURE = 0.7
PER_CATEGORY = "fastchat"


def fastchat_temperature(question: Question) -> float:
    """The sampling temperature FastChat's `gen_*_answer.py` uses for a question's category."""
    return FASTCHAT_TEMPERATURES.get(question.category, FASTCHAT_DEFAULT_TEMPERATURE)


class AnswerBackend(Protocol):
    temperature: float
    """Sampling temperature of the next `generate` call (0: greedy); `run_answers` may set it per chunk."""

    def generate(self, conversations: Sequence[list[dict]]) -> list[str | None]:
        """One reply per conversation (each ends with the user's turn); None where generation failed."""


def run_answers(questions: Sequence[Question], backend: AnswerBackend, out_path: str | Path, model_id: str,
                chunk_size: int = 8, progress: bool = True,
                temperature_of: Callable[[Question], float] | None = None) -> AnswerStats:
    """Answer every question not yet in `out_path`, `chunk_size` questions per backend call, turn by turn.

    `temperature_of` (e.g. `fastchat_temperature`) sets the backend's temperature per question; chunks then
    hold questions of one temperature. None keeps the backend's own.
    """
    done = set(load_answers(out_path)) if Path(out_path).is_file() else set()
    pending = [q for q in questions if q.question_id not in done]
    temperature = temperature_of or (lambda q: backend.temperature)
    pending.sort(key=lambda q: (temperature(q), len(q.turns[0])))  # similar lengths per batch: less padding
    stats = AnswerStats(skipped=len(questions) - len(pending))
    from tqdm import tqdm

    bar = tqdm(total=len(pending), desc=f"answer {model_id}", unit="q", disable=not progress)
    with AppendWriter(out_path) as writer:
        for chunk in _chunks(pending, chunk_size, temperature):
            backend.temperature = temperature(chunk[0])
            for question, turns in zip(chunk, _answer_chunk(chunk, backend)):
                if turns is None:
                    stats.failed += 1
                    continue
                writer.write(answer_record(question.question_id, model_id, turns))
                stats.written += 1
            bar.update(len(chunk))
    bar.close()
    return stats


def _chunks(questions: list[Question], size: int, key) -> list[list[Question]]:
    """Consecutive runs of at most `size` questions sharing `key` (the list is sorted by it)."""
    chunks: list[list[Question]] = []
    for question in questions:
        if chunks and len(chunks[-1]) < size and key(chunks[-1][0]) == key(question):
            chunks[-1].append(question)
        else:
            chunks.append([question])
    return chunks


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

    The model is loaded by `ds_vicuna.model.loading.load_chat_model` (template, stops and context length from the
    checkpoint's `ds_vicuna.json`) and replies come from the worker's own engine
    (`ds_vicuna.serve.generate.generate_replies`), so a local answer is what the served model would answer.
    """

    def __init__(self, model: str, max_new_tokens: int = DEFAULT_ANSWER_TOKENS, temperature: float = 0.0,
                 device: str | None = None, dtype: str = "auto", adapter: str | None = None):
        """`adapter`: a LoRA adapter folder merged into `model` (its template and tokenizer are used).

        Raises:
            FileNotFoundError, ValueError (AdapterError), TemplateError: from the loader, naming the file.
        """
        from ds_vicuna.model.adapters import adapter_chat_model, load_adapter, merge_into
        from ds_vicuna.model.loading import load_chat_model

        self.chat = load_chat_model(model, device=device or "auto", dtype=dtype)
        if adapter is not None:
            loaded = load_adapter(Path(adapter).name, adapter, self.chat.model)
            merge_into(self.chat.model, loaded)
            self.chat = adapter_chat_model(self.chat, loaded)
        self.max_new_tokens, self.temperature = max_new_tokens, temperature

    def generate(self, conversations: Sequence[list[dict]]) -> list[str | None]:
        from ds_vicuna.serve.generate import generate_replies

        replies = generate_replies(self.chat, conversations, self.max_new_tokens, self.temperature)
        return [None if reply is None else reply.strip() for reply in replies]  # FastChat strips answers too
