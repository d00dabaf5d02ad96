"""Admission on the API server: how much generation it takes on at once, decided before any work starts.

    admission = Admission(max_jobs_per_request=64, max_running_requests=48)
    admission.check_jobs(jobs=8, prompts=1, n=8)     # more than 64: a 400 naming the limit
    with admission.enter():                          # more than 48 requests generating: a 429 with Retry-After
        ...                                          # the request's jobs run

A request is one or more jobs (its prompts times `n`), sent to one worker in one call that the worker admits all
or none (`serve.routing`). The API server itself holds at most `max_running_requests` generation requests; the
rest of its threads stay free, so /health, /v1/models and the refusals themselves are answered at once however
many clients arrive (`serve.cli` sizes the server's threads from this limit). `counts` are the API's queue-depth
and running-jobs gauges, kept by each job's `metrics.JobObserver`.
"""
from __future__ import annotations

import threading

from ds_vicuna.serve.errors import APIError, ErrorCode
from ds_vicuna.serve.metrics import JobCounts

DEFAULT_MAX_JOBS_PER_REQUEST = 64
DEFAULT_MAX_RUNNING_REQUESTS = 48


class Admission:
    """The API server's limits on work in flight (see the module docstring); thread-safe.

    Args:
        max_jobs_per_request: most jobs (prompts x n) one request may ask for; more is a 400.
        max_running_requests: most generation requests in flight; one more is a 429 with Retry-After at once.

    Raises:
        ValueError: a limit below 1.
    """

    def __init__(self, max_jobs_per_request: int = DEFAULT_MAX_JOBS_PER_REQUEST,
                 max_running_requests: int = DEFAULT_MAX_RUNNING_REQUESTS):
        for name, value in (("max_jobs_per_request", max_jobs_per_request),
                            ("max_running_requests", max_running_requests)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.max_jobs_per_request = max_jobs_per_request
        self.max_running_requests = max_running_requests
        self.counts = JobCounts()
        self._running = 0
        self._lock = threading.Lock()

    def check_jobs(self, jobs: int, prompts: int, n: int) -> None:
        """Refuse a request that asks for more jobs than one request may.

        Raises:
            APIError: INVALID_VALUE (400) naming the limit and the parameter to lower ('n', else 'prompt').
        """
        if jobs > self.max_jobs_per_request:
            raise APIError(ErrorCode.INVALID_VALUE, f"this request asks for {jobs} completions ({prompts} "
                           f"prompt(s) x n={n}); this server runs at most {self.max_jobs_per_request} per request "
                           "(--max-jobs-per-request): send fewer prompts or a smaller 'n' per request",
                           "n" if n > 1 else "prompt")

    def enter(self) -> "Ticket":
        """Take a place for one generation request; `close()` the ticket (or use it in `with`) when it ends.

        Raises:
            APIError: QUEUE_FULL (429, Retry-After) when `max_running_requests` are in flight.
        """
        with self._lock:
            if self._running >= self.max_running_requests:
                raise APIError(ErrorCode.QUEUE_FULL, f"this server is running {self._running} requests, its limit "
                               "(--max-running-requests); retry shortly")
            self._running += 1
        return Ticket(self)

    def running_requests(self) -> int:
        with self._lock:
            return self._running

    def _leave(self) -> None:
        with self._lock:
            self._running -= 1


class Ticket:
    """One admitted request's place; `close()` gives it back (once, however often it is called)."""

    def __init__(self, admission: Admission):
        self._admission = admission
        self._closed = False
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._admission._leave()

    def __enter__(self) -> "Ticket":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
