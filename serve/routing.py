"""Routing requests to workers: the controller client, worker selection with failover, a request's event stream.

    upstream = Upstream("http://127.0.0.1:21001", pooled_session(), max_attempts=3, secret=S)
    address, events = upstream.open_batch("vicuna", [job, job])   # streaming: (job index, event), 1st received
    results = upstream.run_batch("vicuna", [job, job])            # whole jobs, unfinished ones retried elsewhere

All the jobs of one API request (its choices and prompts) go to one worker in one call, which admits them all or
none, so a request costs one connection to the controller (one pick) and one to a worker, however many jobs it
holds. A worker that fails before its first event (refused connection, 429, 5xx, broken stream) is excluded and
the batch goes to another one; `run_batch` retries the jobs that did not finish even after tokens, since their
client has seen nothing yet. Every failover leaves one log line. While the controller is unreachable, batches go to
the workers it last named (`LastSeenWorkers`). Connections come from one pooled keep-alive session
(`pooled_session`) and a worker's connection is closed as soon as its batch ends or is refused.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from ds_vicuna.serve.errors import APIError, ErrorCode
from ds_vicuna.serve.http_util import SECRET_HEADER
from ds_vicuna.serve.worker_events import (DoneEvent, ErrorEvent, Event, ProtocolError, TextEvent, TokenLogprob,
                                           is_final, parse_job_line)

log = logging.getLogger(__name__)
RETRYABLE = {ErrorCode.QUEUE_FULL, ErrorCode.WORKER_FAILED, ErrorCode.INTERNAL, ErrorCode.NO_WORKER}
CONTROLLER_TIMEOUT_S = 10
WORKER_TIMEOUT_S = (5, 600)  # (connect, between two reads)
IndexedEvent = tuple[int, Event]


def pooled_session(connections: int = 64):
    """A `requests.Session` whose connections to each host are pooled and kept alive: at most `connections` stay
    open per host, more are opened for a moment when that many calls run at once and closed after use."""
    import requests
    from requests.adapters import HTTPAdapter

    session = requests.Session()
    adapter = HTTPAdapter(pool_connections=16, pool_maxsize=connections, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


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
        http: an object with `get`/`post` like a `requests.Session` (safe across threads), e.g. `pooled_session()`.
        max_attempts: workers tried per job.
        secret: the worker secret, sent with every controller and worker call.
        model_memory: see `serve.api_router.APIConfig.model_memory`.
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
            reply = getattr(self.http, method)(f"{self.controller}{path}", timeout=CONTROLLER_TIMEOUT_S,
                                               headers=self._headers, **kwargs)
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
    def open_batch(self, model: str, payloads: list[dict],
                   tried: list[str] | None = None) -> tuple[str, "BatchStream"]:
        """Start `payloads` (a request's jobs) on one worker, in one call; its first event already received.

        Args:
            tried: workers to leave out; failed ones are appended.

        Returns:
            the worker's address, and (job index, event) pairs; closing them cancels the jobs on the worker.

        Raises:
            APIError: a client error from the worker (e.g. context length), or every attempt failed (a 429 when
                every worker's queue was full: nothing was generated).
        """
        tried = [] if tried is None else tried
        last: APIError | None = None
        for _ in range(self.max_attempts):
            try:
                address = self.pick(model, tried)
            except APIError as err:
                raise (last if last is not None and err.code is ErrorCode.NO_WORKER else err) from None
            try:
                # each job names its model: a worker may serve several (a base and its LoRA adapters)
                events = self._start(address, [{**payload, "model": model} for payload in payloads])
                first = next(events)
            except APIError as err:
                if err.code not in RETRYABLE:
                    raise
                self._failed_over(address, model, err.message, tried)
                last = err
                continue
            index, event = first
            if isinstance(event, ErrorEvent):
                close_stream(events)
                code = _code(event.code)
                if code not in RETRYABLE:
                    raise APIError(code, event.message)
                self._failed_over(address, model, event.message, tried)
                last = APIError(ErrorCode.WORKER_FAILED, f"a worker failed: {event.message}")
                continue
            return address, BatchStream(first, events)
        raise last or APIError(ErrorCode.NO_WORKER, f"no worker could serve model '{model}'")

    @staticmethod
    def _failed_over(address: str, model: str, reason: str, tried: list[str]) -> None:
        tried.append(address)
        log.warning("failover: worker %s failed a request for model %r (%s); trying another", address, model,
                    reason)

    def _start(self, address: str, payloads: list[dict]) -> Iterator[IndexedEvent]:
        try:
            reply = self.http.post(f"{address}/worker_generate_batch", json={"jobs": payloads}, stream=True,
                                   timeout=WORKER_TIMEOUT_S, headers=self._headers)
        except Exception as err:
            log.warning("worker %s unreachable: %s", address, err)
            raise APIError(ErrorCode.WORKER_FAILED, f"a worker was unreachable ({type(err).__name__})") from None
        if reply.status_code != 200:
            body = _json_or_none(reply)
            reply.close()  # refused: its socket goes now, not when the garbage is collected
            err = APIError.from_body(body, reply.status_code)
            if err.code is ErrorCode.INVALID_WORKER_SECRET:  # our configuration, not the client's request
                log.error("worker %s refused this API server's worker secret", address)
                err = APIError(ErrorCode.WORKER_FAILED, "a worker refused this API server (wrong worker secret)")
            raise err
        return self._lines(reply, address, len(payloads))

    @staticmethod
    def _lines(reply, address: str, jobs: int) -> Iterator[IndexedEvent]:
        open_jobs = set(range(jobs))
        try:
            for line in reply.iter_lines():
                if not line:
                    continue
                index, event = parse_job_line(line)
                if index not in open_jobs:
                    raise ProtocolError(f"an event for job {index}, which is not open")
                if is_final(event):
                    open_jobs.discard(index)
                yield index, event
                if not open_jobs:
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

    def run_batch(self, model: str, payloads: list[dict], cancel: threading.Event | None = None,
                  observe: Callable[[int, Event], None] | None = None) -> list["JobResult"]:
        """Run a request's jobs to the end on one worker; jobs that did not finish are retried on another.

        Args:
            cancel: once set (the client went away), the worker connection is closed at its next event, which
                cancels the jobs on the worker.
            observe: called with (job index, event) for every event (metrics).

        Raises:
            APIError: a client error, every attempt failed, or CLIENT_CLOSED after `cancel`.
        """
        results: list[JobResult | None] = [None] * len(payloads)
        tried: list[str] = []
        last: APIError | None = None
        for _ in range(self.max_attempts):
            pending = [i for i, result in enumerate(results) if result is None]
            if not pending:
                break
            try:
                address, events = self.open_batch(model, [payloads[i] for i in pending], tried)
            except APIError as err:  # after a batch broke mid-way, its error says more than "none left"
                raise (last if last is not None and err.code is ErrorCode.NO_WORKER else err) from None
            collected = [_Collected() for _ in pending]
            try:
                for k, event in events:
                    if cancel is not None and cancel.is_set():
                        raise APIError(ErrorCode.CLIENT_CLOSED, "the client closed the connection")
                    if observe is not None:
                        observe(pending[k], event)
                    collected[k].add(event)
            except APIError as err:
                if err.code not in RETRYABLE:
                    raise
                last = err
            finally:
                events.close()
            for k, job in enumerate(collected):
                if job.error is not None and job.error.code not in RETRYABLE:
                    raise job.error
                results[pending[k]] = job.result
                last = job.error or last
            if any(result is None for result in results):
                self._failed_over(address, model, last.message if last else "jobs did not finish", tried)
        if any(result is None for result in results):
            raise last or APIError(ErrorCode.NO_WORKER, f"no worker could serve model '{model}'")
        return results


class _Collected:
    """One job's events gathered into a `JobResult` (or its error)."""

    def __init__(self):
        self.parts: list[str] = []
        self.logprobs: list[TokenLogprob] = []
        self.first_text_at: float | None = None
        self.result: JobResult | None = None
        self.error: APIError | None = None

    def add(self, event: Event) -> None:
        if isinstance(event, TextEvent):
            self.first_text_at = self.first_text_at or time.monotonic()
            self.parts.append(event.text)
            self.logprobs.extend(event.logprobs)
        elif isinstance(event, DoneEvent):
            self.result = JobResult("".join(self.parts), event.finish_reason, event.prompt_tokens,
                                    event.completion_tokens, self.logprobs + list(event.logprobs),
                                    event.prompt_logprobs, self.first_text_at)
        else:
            code = _code(event.code)
            self.error = APIError(code if code not in RETRYABLE else ErrorCode.WORKER_FAILED,
                                  f"a worker failed: {event.message}" if code in RETRYABLE else event.message)


def _code(value: str) -> ErrorCode:
    try:
        return ErrorCode(value)
    except ValueError:
        return ErrorCode.WORKER_FAILED


def _is_ours(body) -> bool:
    """An error body in our own shape (e.g. the controller's 503 while workers re-register) is an answer."""
    return isinstance(body, dict) and isinstance(body.get("error"), dict) and "code" in body["error"]


class BatchStream:
    """A request's events as (job index, event): `first` (already received), then `events`. `close()` closes
    `events`, and so the worker connection, whether or not iteration began (closing a generator that never
    started runs no `finally`)."""

    def __init__(self, first: IndexedEvent, events: Iterator[IndexedEvent]):
        self._first: list[IndexedEvent] = [first]
        self._events = events

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> IndexedEvent:
        return self._first.pop() if self._first else next(self._events)

    def close(self) -> None:
        close_stream(self._events)


def close_stream(stream) -> None:
    """Close a batch stream (or any iterator with `close`), ending its worker connection."""
    close = getattr(stream, "close", None)
    if close is not None:
        close()


def _json_or_none(reply):
    try:
        return reply.json()
    except Exception:
        return None
