"""The logic of the OpenAI-compatible endpoints: parse -> moderate -> plan one job per choice -> admit -> route
-> respond.

    service = ChatService(moderator, upstream, metrics, Admission(max_jobs_per_request=64))
    service.chat(body)          # a chat.completion dict, or an iterator of SSE bytes when streaming
    service.completion(body)    # a text_completion dict, or SSE bytes

Each choice is one job; a request's jobs go to one worker in one call (`serve.routing`). Admission comes before
any work (`serve.admission`): too many jobs in one request is a 400 naming the limit, too many requests in flight
here, or a request whose jobs no worker can queue now, a 429 with `Retry-After` at once; no live worker is a 503.
A client that goes away cancels its jobs, streaming or not. HTTP is `serve.api_router`.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

from ds_vicuna.serve.admission import Admission, Ticket
from ds_vicuna.serve.errors import APIError, ErrorCode
from ds_vicuna.serve.metrics import JobObserver, ServingMetrics
from ds_vicuna.serve.moderation import Moderator
from ds_vicuna.serve.openai_protocol import (Choice, GenerationOptions, Usage, chat_chunk, chat_logprobs, chat_response,
                                             completion_chunk, completion_logprobs, completion_response, new_id,
                                             parse_chat_request, parse_completion_request, sse, usage_chunk)
from ds_vicuna.serve.routing import BatchStream, JobResult, Upstream
from ds_vicuna.serve.worker_events import DoneEvent, TextEvent

log = logging.getLogger(__name__)


@dataclass
class JobPlan:
    """One choice of a request: the worker payload, and what the response puts in front of its text."""

    index: int
    payload: dict
    prompt_index: int = 0
    echo_text: str | None = None  # the prompt when echoing a text prompt; token prompts echo their tokens


class ChatService:
    """The request logic behind the HTTP handlers (parse -> moderate -> route -> respond).

    Args:
        moderator: the input filter every prompt and message goes through.
        upstream: the controller/worker client.
        metrics: where durations, time to first token, inter-token latency, tokens and in-stream errors are
            counted.
        admission: the limits on jobs per request and requests in flight (default: `Admission()`).
        poll: seconds between checks that a non-streaming client is still connected.
    """

    def __init__(self, moderator: Moderator, upstream: Upstream, metrics: ServingMetrics | None = None,
                 admission: Admission | None = None, poll: float = 0.25):
        self.moderator = moderator
        self.upstream = upstream
        self.metrics = metrics or ServingMetrics()
        self.admission = admission or Admission()
        self.poll = poll

    def chat(self, body: dict, disconnected: Callable[[], bool] | None = None):
        """A chat.completion dict, or an iterator of SSE bytes when streaming."""
        options, messages = parse_chat_request(body)
        self.admission.check_jobs(options.n, 1, options.n)
        self.moderator.check([m.content for m in messages])
        payload = {"messages": [m.as_dict() for m in messages]}
        plans = [JobPlan(i, {**payload, "params": options.worker_params(i)}) for i in range(options.n)]
        return self._run(options, plans, chat=True, disconnected=disconnected)

    def completion(self, body: dict, disconnected: Callable[[], bool] | None = None):
        """A text_completion dict, or an iterator of SSE bytes when streaming."""
        options, prompts = parse_completion_request(body)
        self.admission.check_jobs(options.choices, len(prompts), options.n)
        self.moderator.check([p for p in prompts if isinstance(p, str)])
        plans = []
        for p, prompt in enumerate(prompts):
            for j in range(options.n):
                index = p * options.n + j
                params = options.worker_params(index)
                if options.sampling.echo and isinstance(prompt, list):  # its text comes from its tokens' texts
                    params["logprobs"] = True
                payload = {"prompt": prompt} if isinstance(prompt, str) else {"prompt_ids": prompt}
                echo = prompt if options.sampling.echo and isinstance(prompt, str) else None
                plans.append(JobPlan(index, {**payload, "params": params}, p, echo))
        return self._run(options, plans, chat=False, disconnected=disconnected)

    def _run(self, options: GenerationOptions, plans: list[JobPlan], chat: bool,
             disconnected: Callable[[], bool] | None):
        end = _RequestEnd(self.metrics, self.admission.enter())  # a 429 now, before any work, at this server's limit
        observers = [self.metrics.observer(self.admission.counts, end.started) for _ in plans]
        end.observers = observers
        try:
            if not options.stream:
                return self._collect(options, plans, chat, disconnected or (lambda: False), observers)
            # the worker admits every job or none before answering: a full queue is a 429 with nothing generated
            _, events = self.upstream.open_batch(options.model, [plan.payload for plan in plans])
        except BaseException:
            end()
            raise
        finally:
            if not options.stream:
                end()
        return _Closing(self._sse(options, plans, events, chat, observers), lambda: (events.close(), end()))

    def _collect(self, options: GenerationOptions, plans: list[JobPlan], chat: bool,
                 disconnected: Callable[[], bool], observers: list[JobObserver]) -> dict:
        outcome: list = []
        cancel = threading.Event()

        def run():
            try:
                outcome.append(self.upstream.run_batch(options.model, [plan.payload for plan in plans], cancel,
                                                       lambda i, event: observers[i](event)))
            except BaseException as err:  # handed to the request thread
                outcome.append(err)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(self.poll)
            if not cancel.is_set() and disconnected():
                log.info("client went away: cancelling %d job(s) of a non-streaming request", len(plans))
                cancel.set()
        if cancel.is_set():
            raise APIError(ErrorCode.CLIENT_CLOSED, "the client closed the connection")
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        results: list[JobResult] = outcome[0]
        prompt_tokens = {plan.prompt_index: r.prompt_tokens for plan, r in zip(plans, results)}
        usage = Usage(sum(prompt_tokens.values()), sum(r.completion_tokens for r in results))
        choices = [self._choice(options, plan, result, chat) for plan, result in zip(plans, results)]
        build = chat_response if chat else completion_response
        return build(new_id("chatcmpl" if chat else "cmpl"), options.model, choices, usage)

    @staticmethod
    def _choice(options: GenerationOptions, plan: JobPlan, result: JobResult, chat: bool) -> Choice:
        if chat:
            logprobs = chat_logprobs(result.logprobs) if options.sampling.logprobs else None
            return Choice(plan.index, result.text, result.finish_reason, logprobs)
        text, tokens = result.text, list(result.logprobs)
        if options.sampling.echo:
            echo = plan.echo_text if plan.echo_text is not None else "".join(t.token for t in result.prompt_logprobs)
            text, tokens = echo + text, list(result.prompt_logprobs) + tokens
        logprobs = completion_logprobs(tokens) if options.sampling.logprobs else None
        return Choice(plan.index, text, result.finish_reason, logprobs)

    def _sse(self, options: GenerationOptions, plans: list[JobPlan], events: BatchStream, chat: bool,
             observers: list[JobObserver]) -> Iterator[bytes]:
        rid, created, model = new_id("chatcmpl" if chat else "cmpl"), int(time.time()), options.model
        usage, prompt_tokens = Usage(), {}
        offsets = [0] * len(plans)  # characters of each completion choice sent so far (`text_offset`)
        open_choices = set(range(len(plans)))

        def chunk(i: int, text: str | None, finish: str | None, tokens=()) -> bytes:
            index = plans[i].index
            if chat:
                delta = {"role": "assistant", "content": ""} if text is None else ({"content": text} if text else {})
                logprobs = chat_logprobs(tokens) if options.sampling.logprobs and tokens else None
                return sse(chat_chunk(rid, model, created, index, delta, finish, logprobs))
            logprobs = completion_logprobs(tokens, offsets[i]) if options.sampling.logprobs else None
            offsets[i] += sum(len(t.token) for t in tokens)
            return sse(completion_chunk(rid, model, created, index, text or "", finish, logprobs))

        def failed(i: int, message: str) -> bytes:
            log.warning("choice %d of %s failed after streaming began: %s", plans[i].index, rid, message)
            return sse(APIError(ErrorCode.WORKER_FAILED, f"generation failed after streaming began: {message}").body())

        # a client that disconnects closes this (`_Closing`), and the worker connection with it
        for i, plan in enumerate(plans):
            if chat:
                yield chunk(i, None, None)
            elif plan.echo_text is not None:
                yield chunk(i, plan.echo_text, None)
        try:
            for i, event in events:
                observers[i](event)
                if isinstance(event, TextEvent):
                    yield chunk(i, event.text, None, event.logprobs)
                    continue
                open_choices.discard(i)
                if isinstance(event, DoneEvent):
                    prompt_tokens[plans[i].prompt_index] = event.prompt_tokens
                    usage.completion_tokens += event.completion_tokens
                    yield chunk(i, "", event.finish_reason, event.logprobs)
                else:
                    yield failed(i, event.message)
        except APIError as err:  # the worker connection broke: every open choice failed
            for i in sorted(open_choices):
                self.metrics.errors.labels(err.code.value).inc()
                yield failed(i, err.message)
        usage.prompt_tokens = sum(prompt_tokens.values())
        if options.include_usage:
            yield sse(usage_chunk(rid, "chat.completion.chunk" if chat else "text_completion", model, created,
                                  usage))
        yield sse("[DONE]")


class _RequestEnd:
    """Ends a request once (answered, failed or abandoned): its jobs leave the gauges, its admission place is
    freed and its duration is observed."""

    def __init__(self, metrics: ServingMetrics, ticket: Ticket):
        self.metrics, self.ticket, self.started = metrics, ticket, time.monotonic()
        self.observers: list[JobObserver] = []
        self._done = False
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
        for observer in self.observers:
            observer.close()
        self.ticket.close()
        self.metrics.request_duration.observe(time.monotonic() - self.started)


class _Closing:
    """Iterates `chunks`; `on_end` runs once, when they run out or when the WSGI server closes this (the client
    went away), even if iteration never began (closing a generator that never started runs no `finally`)."""

    def __init__(self, chunks: Iterator[bytes], on_end: Callable[[], object]):
        self._chunks, self._on_end = chunks, on_end

    def __iter__(self) -> "_Closing":
        return self

    def __next__(self) -> bytes:
        try:
            return next(self._chunks)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        try:
            self._chunks.close()
        finally:
            self._on_end()
