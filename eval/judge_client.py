"""A small OpenAI-compatible chat client with bounded retries, plus a thread-pool map.

    client = ChatClient.from_env(base_url=None, model=None, api_key=None)   # flags override env
    text = client.complete([{"role": "user", "content": "Hi"}], max_tokens=64)

Environment: OPENAI_BASE_URL (e.g. http://127.0.0.1:8000/v1), OPENAI_API_KEY, DS_VICUNA_JUDGE_MODEL.
Retries: 429, 5xx, timeouts and connection errors are retried with exponential backoff and full jitter, at most
`max_attempts` tries in all; a `Retry-After` header (seconds or an HTTP date) sets the wait instead, capped at
`max_wait`. Other 4xx answers are the caller's mistake and fail at once.
"""
from __future__ import annotations

import email.utils
import os
import random
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, TypeVar

import requests

RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
T, R = TypeVar("T"), TypeVar("R")
_DONE = object()


class JudgeAPIError(RuntimeError):
    """The endpoint failed for good: a non-retryable answer, or retries exhausted."""


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 6
    """Tries in all, the first included."""
    base_wait: float = 1.0
    """Seconds before the first retry; doubled per retry (before jitter)."""
    max_wait: float = 60.0
    """Cap on one wait, Retry-After included."""

    def __post_init__(self):
        if self.max_attempts < 1 or self.base_wait < 0 or self.max_wait < 0:
            raise ValueError("RetryPolicy: max_attempts >= 1 and non-negative waits required")

    def backoff(self, retry: int, rng: random.Random) -> float:
        """Full-jitter exponential backoff for the `retry`-th retry (0-based)."""
        return rng.uniform(0, min(self.max_wait, self.base_wait * 2 ** retry))


@dataclass
class ChatClient:
    """Calls `POST {base_url}/chat/completions` and returns the first choice's text."""

    base_url: str
    model: str
    api_key: str | None = None
    timeout: float = 120.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    sleep: Callable[[float], None] = time.sleep
    rng: random.Random = field(default_factory=random.Random)
    _local: threading.local = field(default_factory=threading.local, repr=False)

    @classmethod
    def from_env(cls, base_url: str | None, model: str | None, api_key: str | None, **kwargs) -> "ChatClient":
        """Flags first, then OPENAI_BASE_URL / DS_VICUNA_JUDGE_MODEL / OPENAI_API_KEY.

        Raises:
            ValueError: no base URL or no model from either source.
        """
        base_url = base_url or os.environ.get("OPENAI_BASE_URL")
        model = model or os.environ.get("DS_VICUNA_JUDGE_MODEL")
        if not base_url:
            raise ValueError("no endpoint: pass --base-url or set OPENAI_BASE_URL (e.g. http://127.0.0.1:8000/v1)")
        if not model:
            raise ValueError("no model: pass --model or set DS_VICUNA_JUDGE_MODEL")
        return cls(base_url.rstrip("/"), model, api_key or os.environ.get("OPENAI_API_KEY"), **kwargs)

    def complete(self, messages: list[dict], *, max_tokens: int = 1024, temperature: float = 0.0) -> str:
        """One chat completion, retried per the policy.

        Raises:
            JudgeAPIError: a non-retryable status, a malformed body, or every attempt failed.
        """
        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature}
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        last_error = ""
        for attempt in range(self.retry.max_attempts):
            try:
                response = self._session().post(f"{self.base_url}/chat/completions", json=body, headers=headers,
                                             timeout=self.timeout)
            except (requests.Timeout, requests.ConnectionError) as err:
                last_error, wait_s = f"{type(err).__name__}: {err}", None
            else:
                if response.status_code == 200:
                    return _choice_text(response)
                last_error = f"HTTP {response.status_code}: {response.text[:200]}"
                if response.status_code not in RETRY_STATUS:
                    raise JudgeAPIError(f"{self.base_url}: {last_error}")
                wait_s = retry_after_seconds(response.headers.get("Retry-After"))
            if attempt + 1 < self.retry.max_attempts:
                backoff = self.retry.backoff(attempt, self.rng)
                self.sleep(min(self.retry.max_wait, wait_s) if wait_s is not None else backoff)
        raise JudgeAPIError(f"{self.base_url}: gave up after {self.retry.max_attempts} attempts; last: {last_error}")

    def _session(self) -> requests.Session:
        """One connection pool per thread (requests.Session is not documented as thread-safe)."""
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """A Retry-After header (delta seconds or HTTP date) as seconds to wait, or None if absent/invalid."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _choice_text(response: requests.Response) -> str:
    try:
        content = response.json()["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as err:
        raise JudgeAPIError(f"malformed chat completion body ({err!r}): {response.text[:200]}") from None
    return content or ""


def map_concurrent(fn: Callable[[T], R], items: Iterable[T],
                   workers: int) -> Iterator[tuple[T, R | None, Exception | None]]:
    """Run `fn` over `items` on `workers` threads; yield `(item, result, error)` as each finishes.

    At most `2 * workers` calls are in flight, so a long item list is not submitted all at once and the
    caller (which writes results from this one thread) sees steady progress.
    """
    items = iter(items)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending = {}
        for item in items:
            pending[pool.submit(fn, item)] = item
            if len(pending) >= 2 * max(1, workers):
                break
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                item = pending.pop(future)
                error = future.exception()
                yield item, (None if error else future.result()), error
                nxt = next(items, _DONE)
                if nxt is not _DONE:
                    pending[pool.submit(fn, nxt)] = nxt
