"""Offline generation with the serving engine: replies of a ChatModel to many conversations, for `eval answer`
and the demo.

    from ds_vicuna.serve.generate import generate_replies
    replies = generate_replies(chat, conversations, max_tokens=512)   # chat: ds_vicuna.model.loading.ChatModel
"""
from __future__ import annotations

import logging
from typing import Sequence

from ds_vicuna.serve.engine import BatchEngine
from ds_vicuna.serve.jobs import GenerationJob, chat_job
from ds_vicuna.serve.sampling import SamplingParams
from ds_vicuna.serve.worker_events import DoneEvent, TextEvent

log = logging.getLogger(__name__)


def generate_replies(chat, conversations: Sequence[Sequence], max_tokens: int, temperature: float = 0.0,
                     top_p: float = 1.0, stop: Sequence[str] = (), max_batch_size: int | None = None,
                     prefill_chunk: int | None = None) -> list[str | None]:
    """Replies of a ChatModel to conversations (each ending with the user's turn), batched like the worker.

    The same engine, prompt, stops and lead handling as a served reply, so `eval answer` with a local model
    writes what the served model would answer. A reply is None where generation failed or the prompt leaves
    no room in the context (logged).
    """
    engine = BatchEngine(chat.model, chat.tokenizer, chat.stop_token_ids, max_batch_size or max(len(conversations), 1),
                         prefill_chunk)
    jobs: list[GenerationJob | None] = []
    for messages in conversations:
        prompt = chat.encoder.encode_prompt(messages)
        room = chat.context_length - len(prompt)
        if room < 1:
            log.warning("a %d-token prompt leaves no room in the %d-token context", len(prompt), chat.context_length)
            jobs.append(None)
            continue
        jobs.append(chat_job(chat, prompt, SamplingParams(min(max_tokens, room), temperature, top_p,
                                                          stop=tuple(stop))))
    engine.run_batch([job for job in jobs if job is not None])
    return [None if job is None else _reply_text(job) for job in jobs]


def _reply_text(job: GenerationJob) -> str | None:
    parts = []
    while True:
        event = job.events.get_nowait()
        if isinstance(event, TextEvent):
            parts.append(event.text)
        elif isinstance(event, DoneEvent):
            return "".join(parts)
        else:
            log.warning("generation failed: %s", event.message)
            return None
