"""The logic of the OpenAI-compatible endpoints: parse -> moderate -> plan one job per choice -> route -> respond.

    service = ChatService(moderator, upstream, metrics)
    service.chat(body)          # a chat.completion dict, or an iterator of SSE bytes when streaming
    service.completion(body)    # a text_completion dict, or SSE bytes

Each choice is one job on a worker (`serve.routing`). A full queue everywhere is a 429 and no live worker a 503,
both with `Retry-After`; a client that goes away cancels its jobs, streaming or not. HTTP is `serve.api_router`.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

from ds_vicuna.serve.errors import APIError, ErrorCode
from ds_vicuna.serve.metrics import ServingMetrics
from ds_vicuna.serve.moderation import Moderator
from ds_vicuna.serve.openai_protocol import (Choice, GenerationOptions, Usage, chat_chunk, chat_logprobs, chat_response,
                                             completion_chunk, completion_logprobs, completion_response, new_id,
                                             parse_chat_request, parse_completion_request, sse, usage_chunk)
from ds_vicuna.serve.routing import JobResult, Upstream, close_stream
from ds_vicuna.serve.worker_events import DoneEvent, ErrorEvent, Event, TextEvent, is_final

log = logging.getLogger(__name__)


def merge_choices(streams: list[Iterator[Event]]) -> Iterator[tuple[int, Event]]:
    """(choice index, event) from several job streams as they arrive; ends after each stream's last event."""
    if len(streams) == 1:
        yield from ((0, event) for event in _guarded(streams[0]))
        return
    merged: "queue.Queue[tuple[int, Event]]" = queue.Queue()
    stop = threading.Event()  # the client went away: every pump closes its stream at its next event

    def pump(index: int, stream: Iterator[Event]):
        guarded = _guarded(stream)
        try:
            for event in guarded:
                if stop.is_set():
                    return
                merged.put((index, event))
        finally:
            guarded.close()

    for index, stream in enumerate(streams):
        threading.Thread(target=pump, args=(index, stream), daemon=True).start()
    open_streams = len(streams)
    try:
        while open_streams:
            index, event = merged.get()
            if is_final(event):
                open_streams -= 1
            yield index, event
    finally:
        stop.set()


def _guarded(stream: Iterator[Event]) -> Iterator[Event]:
    """A job stream whose failure becomes a final `ErrorEvent`; closing it closes the stream."""
    try:
        for event in stream:
            yield event
            if is_final(event):
                return
    except APIError as err:
        yield ErrorEvent(err.message, err.code.value)
    finally:
        close_stream(stream)


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
        metrics: where time to first token, tokens and in-stream errors are counted.
        poll: seconds between checks that a non-streaming client is still connected.
    """

    def __init__(self, moderator: Moderator, upstream: Upstream, metrics: ServingMetrics | None = None,
                 poll: float = 0.25):
        self.moderator = moderator
        self.upstream = upstream
        self.metrics = metrics or ServingMetrics()
        self.poll = poll

    def chat(self, body: dict, disconnected: Callable[[], bool] | None = None):
        """A chat.completion dict, or an iterator of SSE bytes when streaming."""
        options, messages = parse_chat_request(body)
        self.moderator.check([m.content for m in messages])
        payload = {"messages": [m.as_dict() for m in messages]}
        plans = [JobPlan(i, {**payload, "params": options.worker_params(i)}) for i in range(options.n)]
        return self._run(options, plans, chat=True, disconnected=disconnected)

    def completion(self, body: dict, disconnected: Callable[[], bool] | None = None):
        """A text_completion dict, or an iterator of SSE bytes when streaming."""
        options, prompts = parse_completion_request(body)
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
        if not options.stream:
            return self._collect(options, plans, chat, disconnected or (lambda: False))
        streams: list[Iterator[Event]] = []
        started = time.monotonic()
        try:
            for plan in plans:
                streams.append(self.upstream.open(options.model, plan.payload))  # errors surface as HTTP status
        except APIError:
            for stream in streams:  # choices already started must not keep a worker busy
                close_stream(stream)
            raise
        return self._sse(options, plans, streams, chat, started)

    def _collect(self, options: GenerationOptions, plans: list[JobPlan], chat: bool,
                 disconnected: Callable[[], bool]) -> dict:
        results: list[JobResult | APIError | None] = [None] * len(plans)
        cancel = threading.Event()
        started = time.monotonic()

        def run(i: int):
            try:
                results[i] = self.upstream.complete(options.model, plans[i].payload, cancel)
            except APIError as err:
                results[i] = err

        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(plans))]
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():
                thread.join(self.poll)
                if not cancel.is_set() and disconnected():
                    log.info("client went away: cancelling %d job(s) of a non-streaming request", len(plans))
                    cancel.set()
        if cancel.is_set():
            raise APIError(ErrorCode.CLIENT_CLOSED, "the client closed the connection")
        for result in results:
            if isinstance(result, APIError):
                raise result
        for result in results:
            if result.first_text_at is not None:
                self.metrics.time_to_first_token.observe(result.first_text_at - started)
        prompt_tokens = {plan.prompt_index: r.prompt_tokens for plan, r in zip(plans, results)}
        usage = Usage(sum(prompt_tokens.values()), sum(r.completion_tokens for r in results))
        self.metrics.job_finished(usage.prompt_tokens, usage.completion_tokens)
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

    def _sse(self, options: GenerationOptions, plans: list[JobPlan], streams: list[Iterator[Event]], chat: bool,
             started: float) -> Iterator[bytes]:
        rid, created, model = new_id("chatcmpl" if chat else "cmpl"), int(time.time()), options.model
        usage, prompt_tokens = Usage(), {}
        offsets = [0] * len(plans)  # characters of each completion choice sent so far (`text_offset`)
        first_text = [True] * len(plans)

        def chunk(i: int, text: str | None, finish: str | None, tokens=()) -> bytes:
            index = plans[i].index
            if chat:
                delta = {"role": "assistant", "content": ""} if text is None else ({"content": text} if text else {})
                logprobs = chat_logprobs(tokens) if options.sampling.logprobs and tokens else None
                return sse(chat_chunk(rid, model, created, index, delta, finish, logprobs))
            logprobs = completion_logprobs(tokens, offsets[i]) if options.sampling.logprobs else None
            offsets[i] += sum(len(t.token) for t in tokens)
            return sse(completion_chunk(rid, model, created, index, text or "", finish, logprobs))

        for i, plan in enumerate(plans):
            if chat:
                yield chunk(i, None, None)
            elif plan.echo_text is not None:
                yield chunk(i, plan.echo_text, None)
        merged = merge_choices(streams)
        try:  # a client that disconnects closes this generator: close every worker stream with it
            for i, event in merged:
                if isinstance(event, TextEvent):
                    if first_text[i]:
                        first_text[i] = False
                        self.metrics.time_to_first_token.observe(time.monotonic() - started)
                    yield chunk(i, event.text, None, event.logprobs)
                elif isinstance(event, DoneEvent):
                    prompt_tokens[plans[i].prompt_index] = event.prompt_tokens
                    usage.completion_tokens += event.completion_tokens
                    self.metrics.job_finished(0, event.completion_tokens)
                    yield chunk(i, "", event.finish_reason, event.logprobs)
                else:
                    self.metrics.errors.labels(ErrorCode.WORKER_FAILED.value).inc()
                    log.warning("choice %d of %s failed after streaming began: %s", plans[i].index, rid,
                                event.message)
                    err = APIError(ErrorCode.WORKER_FAILED, f"generation failed after streaming began: "
                                   f"{event.message}")
                    yield sse(err.body())
        finally:
            merged.close()
        usage.prompt_tokens = sum(prompt_tokens.values())
        self.metrics.prompt_tokens.inc(usage.prompt_tokens)
        if options.include_usage:
            yield sse(usage_chunk(rid, "chat.completion.chunk" if chat else "text_completion",
                                                  model, created, usage))
        yield sse("[DONE]")
