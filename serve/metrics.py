"""`/metrics` in Prometheus text format for the API server and each worker.

    curl -s http://127.0.0.1:8000/metrics -H "Authorization: Bearer $KEY"          # the API (its API key)
    curl -s http://127.0.0.1:21002/metrics -H "X-Worker-Secret: $SECRET"           # a worker (the worker secret)

Prometheus scrapes either with `authorization: {credentials: ...}` in its scrape config. Every server keeps its
own `prometheus_client.CollectorRegistry` (no module-level state), so several servers in one process (`serve all`,
tests) never mix their numbers.

Series: `ds_vicuna_requests_total{endpoint,status}`, `ds_vicuna_errors_total{code}` (error responses and errors
inside a stream, by `errors.ErrorCode`), histograms `ds_vicuna_request_duration_seconds` (API: a generation
request from arrival to its last event; worker: a job from admission to its end),
`ds_vicuna_time_to_first_token_seconds` and `ds_vicuna_inter_token_latency_seconds` (per generated token),
`ds_vicuna_prompt_tokens_total`, `ds_vicuna_generation_tokens_total` (counted as tokens arrive, so a stream whose
client went away counts what it generated), `ds_vicuna_generation_tokens_per_second` (over the last `window`
seconds), and gauges `ds_vicuna_queue_depth` (jobs admitted that wait for their first token: on a worker, for
a batch slot), `ds_vicuna_running_jobs` (jobs generating), `ds_vicuna_queue_limit`; on the API also
`ds_vicuna_running_requests`. One `JobObserver` per job turns its events into these numbers, on both sides.
"""
from __future__ import annotations

import collections
import threading
import time
from typing import Callable

from ds_vicuna.serve.worker_events import DoneEvent, ErrorEvent, Event, TextEvent

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0)
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
INTER_TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class ServingMetrics:
    """The counters one server keeps, and their text rendering.

    Args:
        window: seconds over which `ds_vicuna_generation_tokens_per_second` is averaged.
        clock: returns seconds (monotonic); injected so tests control time.
    """

    def __init__(self, window: float = 30.0, clock: Callable[[], float] = time.monotonic):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        self._window, self._clock = window, clock
        self._recent: collections.deque[tuple[float, int]] = collections.deque()  # (finished at, tokens)
        self._lock = threading.Lock()
        self.requests = Counter("ds_vicuna_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.errors = Counter("ds_vicuna_errors", "Errors returned to clients (responses and in-stream), by code",
                              ["code"], registry=self.registry)
        self.time_to_first_token = Histogram("ds_vicuna_time_to_first_token_seconds",
                                             "Seconds from a job's start to its first text", buckets=TTFT_BUCKETS,
                                             registry=self.registry)
        self.prompt_tokens = Counter("ds_vicuna_prompt_tokens", "Prompt tokens of finished jobs",
                                     registry=self.registry)
        self.generation_tokens = Counter("ds_vicuna_generation_tokens", "Tokens generated (counted as they "
                                         "arrive, finished or not)", registry=self.registry)
        self.request_duration = Histogram("ds_vicuna_request_duration_seconds", "Seconds from a generation "
                                          "request's arrival (worker: a job's admission) to its end",
                                          buckets=DURATION_BUCKETS, registry=self.registry)
        self.inter_token_latency = Histogram("ds_vicuna_inter_token_latency_seconds", "Seconds between two "
                                             "generated tokens of a job", buckets=INTER_TOKEN_BUCKETS,
                                             registry=self.registry)
        Gauge("ds_vicuna_generation_tokens_per_second", f"Tokens generated per second over the last {window:g} s "
              "(counted as they arrive)", registry=self.registry).set_function(self.tokens_per_second)

    def gauge(self, name: str, doc: str, read: Callable[[], float]) -> None:
        """A gauge read at each scrape (e.g. a worker's queue length)."""
        from prometheus_client import Gauge

        Gauge(name, doc, registry=self.registry).set_function(read)

    def tokens_generated(self, count: int) -> None:
        """Count `count` generated tokens now (also in the tokens/s window)."""
        if count <= 0:
            return
        self.generation_tokens.inc(count)
        with self._lock:
            self._recent.append((self._clock(), count))

    def job_finished(self, prompt_tokens: int, completion_tokens: int) -> None:
        """Count a whole job at its end (for callers that do not see its tokens arrive)."""
        self.prompt_tokens.inc(prompt_tokens)
        self.tokens_generated(completion_tokens)

    def observer(self, counts: "JobCounts | None" = None, started: float | None = None,
                 timed: bool = False) -> "JobObserver":
        """A `JobObserver` for one job that starts now (or at `started`, a `time.monotonic()` value); `timed`:
        its duration goes to `ds_vicuna_request_duration_seconds` (a worker's jobs)."""
        return JobObserver(self, counts, started, timed)

    def tokens_per_second(self) -> float:
        now = self._clock()
        with self._lock:
            while self._recent and now - self._recent[0][0] > self._window:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / self._window

    def render(self) -> tuple[bytes, str]:
        """The metrics as (body, content type) in Prometheus text format."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class JobCounts:
    """Jobs waiting for their first token and jobs generating, kept up to date by `JobObserver`s (thread-safe)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.waiting = 0
        self.running = 0

    def change(self, waiting: int = 0, running: int = 0) -> None:
        with self._lock:
            self.waiting += waiting
            self.running += running


class JobObserver:
    """Turns one job's events into metrics as they happen: time to first token, inter-token latency, tokens (as
    they arrive), prompt tokens and errors at its end; `close()` ends a job that never got its final event (its
    client went away). The job counts as waiting in `counts` until its first text, then as running.

    Args:
        metrics: where to count.
        counts: the waiting/running gauges to keep, or None.
        started: `time.monotonic()` when the job began (default: now).
        timed: observe the job's duration at its final event.
    """

    def __init__(self, metrics: ServingMetrics, counts: JobCounts | None = None, started: float | None = None,
                 timed: bool = False):
        self.metrics, self.counts, self.timed = metrics, counts, timed
        self.started = time.monotonic() if started is None else started
        self.last: float | None = None  # when the last text arrived
        self.tokens = 0
        self.ended = False
        if counts is not None:
            counts.change(waiting=1)

    def __call__(self, event: Event) -> None:
        if self.ended:
            return
        now = time.monotonic()
        if isinstance(event, TextEvent):
            count = event.tokens or max(len(event.logprobs), 1 if event.text else 0)
            if self.last is None:
                self.metrics.time_to_first_token.observe(now - self.started)
                if self.counts is not None:
                    self.counts.change(waiting=-1, running=1)
            elif count:
                for _ in range(count):
                    self.metrics.inter_token_latency.observe((now - self.last) / count)
            self.last = now
            self.tokens += count
            self.metrics.tokens_generated(count)
        elif isinstance(event, DoneEvent):
            self.metrics.prompt_tokens.inc(event.prompt_tokens)
            self.metrics.tokens_generated(event.completion_tokens - self.tokens)  # held back, or not said
            self._end(now)
        elif isinstance(event, ErrorEvent):
            self.metrics.errors.labels(event.code).inc()
            self._end(now)

    def close(self) -> None:
        """The job will get no more events (its stream was closed): leave the gauges."""
        self._end()

    def _end(self, now: float | None = None) -> None:
        if self.ended:
            return
        self.ended = True
        if self.timed and now is not None:
            self.metrics.request_duration.observe(now - self.started)
        if self.counts is not None:
            self.counts.change(waiting=-1 if self.last is None else 0, running=-1 if self.last is not None else 0)


def install_metrics(app, metrics: ServingMetrics) -> None:
    """Count every answered request by route and status, and serve `GET /metrics` (auth is the app's own)."""
    from flask import Response, request

    @app.after_request
    def count(response):
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        metrics.requests.labels(route, str(response.status_code)).inc()
        return response

    @app.get("/metrics")
    def serve_metrics():
        body, content_type = metrics.render()
        return Response(body, content_type=content_type)
