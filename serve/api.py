"""OpenAI-compatible API server and the web chat page.

    ds-vicuna serve api --controller http://127.0.0.1:21001 --port 8000 [--api-key K ...]

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="K")

Endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions (streaming as server-sent events
ending `data: [DONE]`), GET /health (200 only while a worker is registered; "degraded" while the controller is
unreachable), GET /metrics (Prometheus text format; needs an API key when keys are set), GET / (the chat page).

Each choice is one job on a worker picked by the controller. A worker that fails before its first token (refused
connection, 429, 5xx, broken stream) is excluded and the job goes to another one; a non-streaming request is
retried even after tokens, since the client has seen nothing yet. Every failover leaves one log line. A full
queue everywhere is a 429 and no live worker a 503, both with `Retry-After`; a client that goes away cancels its
jobs, streaming or not.
"""
from __future__ import annotations

import hmac
import itertools
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from ds_vicuna.serve import schemas
from ds_vicuna.serve.http_util import SECRET_HEADER
from ds_vicuna.serve.metrics import ServingMetrics
from ds_vicuna.serve.moderation import Moderator
from ds_vicuna.serve.protocol import (DoneEvent, ErrorEvent, Event, ProtocolError, TextEvent, TokenLogprob, is_final,
                                      parse_line)
from ds_vicuna.serve.schemas import APIError, Choice, ErrorCode, GenerationOptions, Usage

log = logging.getLogger("ds_vicuna.serve.api")
STATIC_DIR = Path(__file__).parent / "static"
RETRYABLE = {ErrorCode.QUEUE_FULL, ErrorCode.WORKER_FAILED, ErrorCode.INTERNAL, ErrorCode.NO_WORKER}


@dataclass
class APIConfig:
    """Settings of the API server.

    Attributes:
        controller: the controller's URL.
        api_keys: accepted Bearer keys; empty means no authentication (only on a trusted host).
        max_content_length: request body limit in bytes (413 above it).
        max_attempts: workers tried per choice before giving up.
        moderator: the input filter (inactive by default).
        worker_secret: sent to the controller and workers (`X-Worker-Secret`), which refuse calls without it.
        model_memory: seconds a model stays "served a moment ago": asked for while no worker serves it (a
            controller restart, a worker restarting), it is a 503 the client retries, not a 404.
    """

    controller: str
    api_keys: tuple[str, ...] = ()
    max_content_length: int = 1024 * 1024
    max_attempts: int = 3
    moderator: Moderator = field(default_factory=Moderator)
    worker_secret: str | None = None
    model_memory: float = 120.0


class ControllerDown(Exception):
    """The controller did not answer (refused, timed out, or failed with a 5xx)."""


class LastSeenWorkers:
    """The workers the controller last named for each model, kept to route by while the controller is down.

    Args:
        clock: returns seconds (monotonic).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._workers: dict[str, tuple[list[str], float]] = {}  # model -> (addresses, when the controller said so)
        self._turn = itertools.count()
        self._lock = threading.Lock()

    def saw(self, model: str, addresses: list[str]) -> None:
        with self._lock:
            self._workers[model] = (list(addresses), self._clock())

    def seen_within(self, model: str, seconds: float) -> float | None:
        """Seconds since the controller last named a worker for `model`, if within `seconds`; else None."""
        with self._lock:
            entry = self._workers.get(model)
        age = None if entry is None else self._clock() - entry[1]
        return age if age is not None and age <= seconds else None

    def models(self) -> list[str]:
        with self._lock:
            return sorted(m for m, (addresses, _) in self._workers.items() if addresses)

    def pick(self, model: str, exclude: list[str]) -> str | None:
        """One of the last-seen workers of `model` not in `exclude` (taking turns), or None."""
        with self._lock:
            addresses = [a for a in self._workers.get(model, ([], 0.0))[0] if a not in exclude]
            return addresses[next(self._turn) % len(addresses)] if addresses else None


@dataclass
class JobResult:
    """One job run to its end."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: tuple[TokenLogprob, ...] = ()
    first_text_at: float | None = None  # time.monotonic() when its first text arrived


class Upstream:
    """Talks to the controller and workers; opens one job's event stream with failover.

    While the controller is unreachable, jobs go to the workers it last named for their model (failing ones are
    skipped per job as always), so a controller outage is not a service outage. Client-facing messages never
    name an internal URL; the log does.

    Args:
        controller: the controller's URL.
        http: an object with `get`/`post` like the `requests` module (stateless, safe across threads).
        max_attempts: workers tried per job.
        secret: the worker secret, sent with every controller and worker call.
        model_memory: see `APIConfig.model_memory`.
        clock: returns seconds (monotonic).
    """

    def __init__(self, controller: str, http, max_attempts: int = 3, secret: str | None = None,
                 model_memory: float = 120.0, clock: Callable[[], float] = time.monotonic):
        self.controller = controller.rstrip("/")
        self.http = http
        self.max_attempts = max_attempts
        self.model_memory = model_memory
        self.last_seen = LastSeenWorkers(clock)
        self.controller_up = True  # as of the last call
        self._headers = {SECRET_HEADER: secret} if secret else {}
        self._state_lock = threading.Lock()

    def _controller_state(self, up: bool, reason: str = "") -> None:
        """Track the controller's reachability; one log line when it changes (not one per request)."""
        with self._state_lock:
            changed, self.controller_up = up != self.controller_up, up
        if changed and not up:
            log.warning("controller %s unreachable (%s): routing to the workers it last named (%s)",
                        self.controller, reason, ", ".join(self.last_seen.models()) or "none known")
        elif changed:
            log.warning("controller %s reachable again", self.controller)

    # ---- the controller -----------------------------------------------------------------------------------
    def models(self) -> list[str]:
        """Served model names; the last-seen ones while the controller is unreachable.

        Raises:
            APIError: NO_WORKER when the controller is down and no worker was ever seen.
        """
        try:
            return list(self._call("get", "/list_models").get("models", []))
        except ControllerDown as err:
            names = self.last_seen.models()
            if not names:
                raise APIError(ErrorCode.NO_WORKER, f"the controller is unreachable ({err})") from None
            return names

    def _call(self, method: str, path: str, **kwargs) -> dict:
        try:
            reply = getattr(self.http, method)(f"{self.controller}{path}", timeout=10, headers=self._headers,
                                               **kwargs)
        except Exception as err:
            self._controller_state(False, type(err).__name__)
            raise ControllerDown(type(err).__name__) from None
        body = _json_or_none(reply)
        if reply.status_code >= 500 and not _is_ours(body):
            self._controller_state(False, f"HTTP {reply.status_code}")
            raise ControllerDown(f"HTTP {reply.status_code}")
        self._controller_state(True)
        if reply.status_code != 200:
            err = APIError.from_body(body, reply.status_code)
            if err.code is ErrorCode.INVALID_WORKER_SECRET:  # our configuration, not the client's request
                log.error("the controller %s refused this API server's worker secret (--worker-secret)",
                          self.controller)
                raise APIError(ErrorCode.INTERNAL, "the API server is misconfigured (the controller refused it)")
            raise err
        return body or {}

    def pick(self, model: str, exclude: list[str]) -> str:
        """The worker for a job: the controller's choice, else (controller down) a last-seen worker.

        Raises:
            APIError: MODEL_NOT_FOUND (404) for a model nobody served lately, NO_WORKER (503, retryable) for one
                served a moment ago that has no live worker now, or when every worker was tried.
        """
        try:
            reply = self._call("post", "/get_worker_address", json={"model": model, "exclude": exclude})
        except ControllerDown as err:
            address = self.last_seen.pick(model, exclude)
            if address is None:
                raise APIError(ErrorCode.NO_WORKER, f"the controller is unreachable ({err}) and no other worker "
                               f"of model '{model}' is known") from None
            return address
        except APIError as err:
            age = self.last_seen.seen_within(model, self.model_memory)
            if err.code is ErrorCode.MODEL_NOT_FOUND and age is not None:
                raise APIError(ErrorCode.NO_WORKER, f"the model '{model}' was served {age:.0f} s ago but has no "
                               "live worker right now; retry shortly", "model") from None
            raise
        address = reply["address"]
        self.last_seen.saw(model, list(reply.get("workers") or [address]))
        return address

    # ---- workers --------------------------------------------------------------------------------------------
    def open(self, model: str, payload: dict) -> Iterator[Event]:
        """Events of one job (`serve.protocol`), its first event already received.

        Raises:
            APIError: a client error from the worker (e.g. context length), or every attempt failed.
        """
        return self.open_at(model, payload, [])[1]

    def open_at(self, model: str, payload: dict, tried: list[str]) -> tuple[str, Iterator[Event]]:
        """Like `open`, also returning the worker's address; failed workers are appended to `tried`."""
        last: APIError | None = None
        for _ in range(self.max_attempts):
            try:
                address = self.pick(model, tried)
            except APIError as err:
                raise (last if last is not None and err.code is ErrorCode.NO_WORKER else err) from None
            try:
                events = self._start(address, payload)
                first = next(events)
            except APIError as err:
                if err.code not in RETRYABLE:
                    raise
                self._failed_over(address, model, err.message, tried)
                last = err
                continue
            if isinstance(first, ErrorEvent):
                self._failed_over(address, model, first.message, tried)
                last = APIError(ErrorCode.WORKER_FAILED, f"a worker failed: {first.message}")
                continue
            return address, JobStream(first, events)
        raise last or APIError(ErrorCode.NO_WORKER, f"no worker could serve model '{model}'")

    @staticmethod
    def _failed_over(address: str, model: str, reason: str, tried: list[str]) -> None:
        tried.append(address)
        log.warning("failover: worker %s failed a job for model %r (%s); trying another", address, model, reason)

    def _start(self, address: str, payload: dict) -> Iterator[Event]:
        try:
            reply = self.http.post(f"{address}/worker_generate_stream", json=payload, stream=True, timeout=(5, 600),
                                   headers=self._headers)
        except Exception as err:
            log.warning("worker %s unreachable: %s", address, err)
            raise APIError(ErrorCode.WORKER_FAILED, f"a worker was unreachable ({type(err).__name__})") from None
        if reply.status_code != 200:
            body = _json_or_none(reply)
            reply.close()
            err = APIError.from_body(body, reply.status_code)
            if err.code is ErrorCode.INVALID_WORKER_SECRET:  # our configuration, not the client's request
                log.error("worker %s refused this API server's worker secret", address)
                err = APIError(ErrorCode.WORKER_FAILED, "a worker refused this API server (wrong worker secret)")
            raise err
        return self._lines(reply, address)

    @staticmethod
    def _lines(reply, address: str) -> Iterator[Event]:
        try:
            for line in reply.iter_lines():
                if line:
                    event = parse_line(line)
                    yield event
                    if is_final(event):
                        return
            raise APIError(ErrorCode.WORKER_FAILED, "a worker closed the stream early")
        except APIError:
            raise
        except ProtocolError as err:
            log.warning("worker %s sent a bad event: %s", address, err)
            raise APIError(ErrorCode.WORKER_FAILED, f"a worker sent a bad event: {err}") from None
        except Exception as err:
            log.warning("worker %s failed mid-stream: %r", address, err)
            raise APIError(ErrorCode.WORKER_FAILED, f"a worker failed mid-stream ({type(err).__name__})") from None
        finally:
            reply.close()

    def complete(self, model: str, payload: dict, cancel: threading.Event | None = None) -> JobResult:
        """Run one job to the end; retried whole on another worker if it fails before the end.

        Args:
            cancel: once set (the client went away), the job's worker connection is closed at its next event,
                which cancels the job on the worker.

        Raises:
            APIError: a client error, every attempt failed, or CLIENT_CLOSED after `cancel`.
        """
        tried: list[str] = []
        last: APIError | None = None
        for _ in range(self.max_attempts):
            try:
                address, events = self.open_at(model, payload, tried)  # tries several workers itself
            except APIError as err:  # after a job broke mid-way, its error says more than "none left"
                raise (last if last is not None and err.code is ErrorCode.NO_WORKER else err) from None
            try:
                return _collect_job(events, cancel)
            except APIError as err:
                if err.code not in RETRYABLE:
                    raise
                self._failed_over(address, model, err.message, tried)
                last = err
        raise last or APIError(ErrorCode.NO_WORKER, f"no worker could serve model '{model}'")


def _collect_job(events: "JobStream", cancel: threading.Event | None) -> JobResult:
    parts: list[str] = []
    logprobs: list[TokenLogprob] = []
    first_text_at = None
    try:
        for event in events:
            if cancel is not None and cancel.is_set():
                raise APIError(ErrorCode.CLIENT_CLOSED, "the client closed the connection")
            if isinstance(event, TextEvent):
                first_text_at = first_text_at or time.monotonic()
                parts.append(event.text)
                logprobs.extend(event.logprobs)
            elif isinstance(event, DoneEvent):
                return JobResult("".join(parts), event.finish_reason, event.prompt_tokens, event.completion_tokens,
                                 logprobs + list(event.logprobs), event.prompt_logprobs, first_text_at)
            else:
                raise APIError(ErrorCode.WORKER_FAILED, f"a worker failed: {event.message}")
        raise APIError(ErrorCode.WORKER_FAILED, "a worker closed the stream early")
    finally:
        events.close()


def _is_ours(body) -> bool:
    """An error body in our own shape (e.g. the controller's 503 while workers re-register) is an answer."""
    return isinstance(body, dict) and isinstance(body.get("error"), dict) and "code" in body["error"]


class JobStream:
    """A job's events: `first` (already received), then `events`. `close()` closes `events`, and so the worker
    connection, whether or not iteration began (closing a generator that never started runs no `finally`)."""

    def __init__(self, first: Event, events: Iterator[Event]):
        self._first: list[Event] = [first]
        self._events = events

    def __iter__(self) -> "JobStream":
        return self

    def __next__(self) -> Event:
        return self._first.pop() if self._first else next(self._events)

    def close(self) -> None:
        _close(self._events)


def _close(stream) -> None:
    close = getattr(stream, "close", None)
    if close is not None:
        close()


def _json_or_none(reply):
    try:
        return reply.json()
    except Exception:
        return None


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
        _close(stream)


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
        config: the server settings.
        upstream: the controller/worker client.
        metrics: where time to first token, tokens and in-stream errors are counted.
        poll: seconds between checks that a non-streaming client is still connected.
    """

    def __init__(self, config: APIConfig, upstream: Upstream, metrics: ServingMetrics | None = None,
                 poll: float = 0.25):
        self.config = config
        self.upstream = upstream
        self.metrics = metrics or ServingMetrics()
        self.poll = poll

    def chat(self, body: dict, disconnected: Callable[[], bool] | None = None):
        """A chat.completion dict, or an iterator of SSE bytes when streaming."""
        options, messages = schemas.parse_chat_request(body)
        self.config.moderator.check([m.content for m in messages])
        payload = {"messages": [m.as_dict() for m in messages]}
        plans = [JobPlan(i, {**payload, "params": options.worker_params(i)}) for i in range(options.n)]
        return self._run(options, plans, chat=True, disconnected=disconnected)

    def completion(self, body: dict, disconnected: Callable[[], bool] | None = None):
        """A text_completion dict, or an iterator of SSE bytes when streaming."""
        options, prompts = schemas.parse_completion_request(body)
        self.config.moderator.check([p for p in prompts if isinstance(p, str)])
        plans = []
        for p, prompt in enumerate(prompts):
            for j in range(options.n):
                index = p * options.n + j
                params = options.worker_params(index)
                if options.echo and isinstance(prompt, list):  # its text comes from its tokens' texts
                    params["logprobs"] = True
                payload = {"prompt": prompt} if isinstance(prompt, str) else {"prompt_ids": prompt}
                echo = prompt if options.echo and isinstance(prompt, str) else None
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
                _close(stream)
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
        build = schemas.chat_response if chat else schemas.completion_response
        return build(schemas.new_id("chatcmpl" if chat else "cmpl"), options.model, choices, usage)

    @staticmethod
    def _choice(options: GenerationOptions, plan: JobPlan, result: JobResult, chat: bool) -> Choice:
        if chat:
            logprobs = schemas.chat_logprobs(result.logprobs) if options.logprobs else None
            return Choice(plan.index, result.text, result.finish_reason, logprobs)
        text, tokens = result.text, list(result.logprobs)
        if options.echo:
            echo = plan.echo_text if plan.echo_text is not None else "".join(t.token for t in result.prompt_logprobs)
            text, tokens = echo + text, list(result.prompt_logprobs) + tokens
        logprobs = schemas.completion_logprobs(tokens) if options.logprobs else None
        return Choice(plan.index, text, result.finish_reason, logprobs)

    def _sse(self, options: GenerationOptions, plans: list[JobPlan], streams: list[Iterator[Event]], chat: bool,
             started: float) -> Iterator[bytes]:
        rid, created, model = schemas.new_id("chatcmpl" if chat else "cmpl"), int(time.time()), options.model
        usage, prompt_tokens = Usage(), {}
        offsets = [0] * len(plans)  # characters of each completion choice sent so far (`text_offset`)
        first_text = [True] * len(plans)

        def chunk(i: int, text: str | None, finish: str | None, tokens=()) -> bytes:
            index = plans[i].index
            if chat:
                delta = {"role": "assistant", "content": ""} if text is None else ({"content": text} if text else {})
                logprobs = schemas.chat_logprobs(tokens) if options.logprobs and tokens else None
                return schemas.sse(schemas.chat_chunk(rid, model, created, index, delta, finish, logprobs))
            logprobs = schemas.completion_logprobs(tokens, offsets[i]) if options.logprobs else None
            offsets[i] += sum(len(t.token) for t in tokens)
            return schemas.sse(schemas.completion_chunk(rid, model, created, index, text or "", finish, logprobs))

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
                    yield schemas.sse(err.body())
        finally:
            merged.close()
        usage.prompt_tokens = sum(prompt_tokens.values())
        self.metrics.prompt_tokens.inc(usage.prompt_tokens)
        if options.include_usage:
            yield schemas.sse(schemas.usage_chunk(rid, "chat.completion.chunk" if chat else "text_completion",
                                                  model, created, usage))
        yield schemas.sse("[DONE]")


def create_app(config: APIConfig, http=None, clock: Callable[[], float] = time.monotonic):
    """The API server's Flask app.

    Args:
        config: the server settings.
        http: the HTTP client for controller and workers (default: the `requests` module).
        clock: returns seconds (monotonic), for the model memory and metrics.
    """
    from flask import Flask, Response, jsonify, request, send_from_directory, stream_with_context

    from ds_vicuna.serve.http_util import install_error_handlers, json_body
    from ds_vicuna.serve.metrics import install_metrics

    if http is None:
        import requests as http
    upstream = Upstream(config.controller, http, config.max_attempts, config.worker_secret, config.model_memory,
                        clock)
    metrics = ServingMetrics(clock=clock)
    service = ChatService(config, upstream, metrics)
    keys = [k.encode() for k in config.api_keys]
    app = Flask(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = config.max_content_length
    install_error_handlers(app, metrics)
    install_metrics(app, metrics)

    @app.before_request
    def authenticate():
        if not keys or not (request.path.startswith("/v1/") or request.path == "/metrics"):
            return None
        given = request.headers.get("Authorization", "")
        token = given[len("Bearer "):].strip().encode() if given.startswith("Bearer ") else b""
        if not any(hmac.compare_digest(token, key) for key in keys):
            raise APIError(ErrorCode.INVALID_API_KEY, "missing or invalid API key: send 'Authorization: Bearer "
                           "<key>'" if token == b"" else "invalid API key")
        return None

    def respond(result):
        if isinstance(result, dict):
            return jsonify(result)
        return Response(stream_with_context(result), mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def disconnected() -> Callable[[], bool]:
        """waitress tells whether the client went away (only with channel_request_lookahead > 0)."""
        return request.environ.get("waitress.client_disconnected") or (lambda: False)

    @app.post("/v1/chat/completions")
    def chat_completions():
        return respond(service.chat(json_body(request), disconnected()))

    @app.post("/v1/completions")
    def completions():
        return respond(service.completion(json_body(request), disconnected()))

    @app.get("/v1/models")
    def models():
        return jsonify(schemas.model_list(upstream.models()))

    @app.get("/health")
    def health():
        try:
            names = upstream.models()
        except APIError as err:
            return jsonify({"status": "unavailable", "reason": err.message}), 503
        if not names:
            return jsonify({"status": "unavailable", "reason": "no worker registered"}), 503
        if not upstream.controller_up:  # still serving: requests go to the workers last seen
            return jsonify({"status": "degraded", "reason": "the controller is unreachable", "models": names})
        return jsonify({"status": "ok", "models": names})

    @app.get("/")
    def index():
        return send_from_directory(STATIC_DIR, "index.html")

    return app


def iter_sse(lines: Iterable[bytes]) -> Iterator[dict]:
    """Parse `data: ...` lines of an SSE stream into dicts (stops at [DONE]); for clients and tests."""
    for line in lines:
        if not line or not line.startswith(b"data: "):
            continue
        data = line[len(b"data: "):]
        if data.strip() == b"[DONE]":
            return
        yield json.loads(data)
