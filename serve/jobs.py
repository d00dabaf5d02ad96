"""A generation job: what the worker (or `generate`) hands the batch engine, and how its events come back.

    job = chat_job(chat, prompt_ids, SamplingParams(max_tokens=64))   # or GenerationJob(prompt_ids, params)
    engine.add([job]); ...; job.events.get()   # TextEvent ..., then one DoneEvent or ErrorEvent
    job.cancelled.set()                        # the client went away: the engine ends the row

    inbox = queue.Queue(); job.events = JobSink(inbox, 3, observe)   # one request's jobs into one queue
"""
from __future__ import annotations

import dataclasses
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from ds_vicuna.serve.sampling import SamplingParams
from ds_vicuna.serve.worker_events import Event


@dataclass
class GenerationJob:
    """One request inside the worker: its prompt ids, settings and the queue its events go to.

    Events put on `events` (`serve.worker_events`): a `TextEvent` for each released piece, then exactly one
    `DoneEvent` or `ErrorEvent`; `events` may be anything with `put`, e.g. a `JobSink`. `reply_lead` is text the
    template expects the model to write before the reply proper (vicuna_v1.1's space after "ASSISTANT:"); it is
    dropped from the reply's start.
    """

    prompt_ids: list[int]
    params: SamplingParams
    events: Any = field(default_factory=queue.Queue)  # queue.Queue[Event], or a JobSink
    cancelled: threading.Event = field(default_factory=threading.Event)
    reply_lead: str = ""
    adapter: str | None = None
    """The LoRA adapter (its model name) this job runs with; None = the base model (`serve.multi_lora`)."""


def chat_job(chat, prompt_ids: list[int], params: SamplingParams, adapter: str | None = None) -> GenerationJob:
    """A job answering a chat turn of `chat` (a ChatModel): the template's stop strings end it, its lead is dropped."""
    stop = tuple(dict.fromkeys(s for s in (*params.stop, *chat.stop_strings) if s))
    return GenerationJob(list(prompt_ids), dataclasses.replace(params, stop=stop), reply_lead=chat.reply_lead,
                         adapter=adapter)


class JobSink:
    """A job's `events` when several jobs share one queue (a request's jobs on a worker): each event goes in as
    (index, event), after `observe` saw it (metrics count a job's tokens even when nobody reads its events).

    Args:
        inbox: the shared queue of (job index, event).
        index: this job's index.
        observe: called with each event first, or None.
    """

    def __init__(self, inbox: "queue.Queue[tuple[int, Event]]", index: int,
                 observe: Callable[[Event], None] | None = None):
        self.inbox, self.index, self.observe = inbox, index, observe

    def put(self, event: Event) -> None:
        if self.observe is not None:
            self.observe(event)
        self.inbox.put((self.index, event))
