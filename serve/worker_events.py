"""The worker -> API event stream: three typed events, one JSON line each.

    from ds_vicuna.serve.worker_events import TextEvent, DoneEvent, ErrorEvent, parse_line, to_line
    line = to_line(TextEvent("Hel"))       # b'{"text": "Hel"}\\n'
    parse_line(line)                       # TextEvent(text='Hel', logprobs=(), tokens=0)
    to_line(TextEvent("Hel", tokens=1), job=3)   # b'{"text": "Hel", "tokens": 1, "job": 3}\\n' (one of a batch)
    parse_job_line(line)                   # (3, TextEvent(...))

A job's stream is zero or more `TextEvent`s, then exactly one `DoneEvent` or `ErrorEvent`. The worker writes
these (`to_line`), the API reads them (`parse_line`), and the test fakes use the same classes, so both sides
agree on one format. A request's jobs travel in one call (`/worker_generate_batch`): each line then also names
its job (`"job": index`) and the jobs' lines interleave. The wire shapes are plain JSON objects:

    {"text": str, "tokens": int, "logprobs": [TokenLogprob...]}   # "tokens" when > 0, "logprobs" when asked for
    {"done": {"finish_reason", "prompt_tokens", "completion_tokens", "prompt_logprobs"?}}
    {"error": {"message": str, "code": str}}                # code: an errors.ErrorCode value

`logprobs` on a text event are the tokens generated since the previous event, and `tokens` counts them (a text
piece may be held back while it could still start a stop string, so pieces and tokens need not line up one to
one); the API counts generated tokens as they arrive, so a stream its client dropped is counted too.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Union


class ProtocolError(ValueError):
    """A line that is not one of the three events."""


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability and, when asked for, the most likely alternatives at its position.

    Attributes:
        token: the token's text (decoded alone).
        logprob: natural-log probability under the model (None for a prompt's first token: nothing predicts it).
        top: the `top_logprobs` most likely (token, logprob) pairs at this position, most likely first.
    """

    token: str
    logprob: float | None
    top: tuple[tuple[str, float], ...] = ()

    def to_dict(self) -> dict:
        return {"token": self.token, "logprob": _finite(self.logprob),
                "top": [[token, _finite(logprob)] for token, logprob in self.top]}

    @classmethod
    def from_dict(cls, raw: dict) -> "TokenLogprob":
        try:
            logprob = raw["logprob"]
            if logprob is not None and not isinstance(logprob, (int, float)):
                raise TypeError("logprob")
            top = tuple((str(t), float(p)) for t, p in raw.get("top", ()))
            return cls(str(raw["token"]), None if logprob is None else float(logprob), top)
        except (KeyError, TypeError, ValueError) as err:
            raise ProtocolError(f"bad logprob entry {raw!r}: {err}") from None


@dataclass(frozen=True)
class TextEvent:
    """A piece of the reply that is final (never half a character, never part of a stop string).

    Attributes:
        text: the piece.
        logprobs: the tokens generated since the previous event, when asked for.
        tokens: how many tokens were generated since the previous event (0 from workers that do not say).
    """

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()
    tokens: int = 0

    def to_dict(self) -> dict:
        body: dict = {"text": self.text}
        if self.tokens:
            body["tokens"] = self.tokens
        if self.logprobs:
            body["logprobs"] = [lp.to_dict() for lp in self.logprobs]
        return body


@dataclass(frozen=True)
class DoneEvent:
    """The job ended normally.

    Attributes:
        finish_reason: "stop" (stop token or string), "length" (max_tokens) or "cancelled" (client left).
        prompt_tokens, completion_tokens: token counts for `usage`.
        logprobs: generated tokens not yet sent with a text event (their text was held back, then dropped).
        prompt_logprobs: per prompt token, when the request asked for `echo` with logprobs.
    """

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: tuple[TokenLogprob, ...] = ()
    prompt_logprobs: tuple[TokenLogprob, ...] = ()

    def to_dict(self) -> dict:
        done: dict = {"finish_reason": self.finish_reason, "prompt_tokens": self.prompt_tokens,
                      "completion_tokens": self.completion_tokens}
        if self.logprobs:
            done["logprobs"] = [lp.to_dict() for lp in self.logprobs]
        if self.prompt_logprobs:
            done["prompt_logprobs"] = [lp.to_dict() for lp in self.prompt_logprobs]
        return {"done": done}


@dataclass(frozen=True)
class ErrorEvent:
    """The job failed; `code` is a `serve.errors.ErrorCode` value (the API maps it to an OpenAI error)."""

    message: str
    code: str = "worker_failed"

    def to_dict(self) -> dict:
        return {"error": {"message": self.message, "code": self.code}}


Event = Union[TextEvent, DoneEvent, ErrorEvent]
FINAL_EVENTS = (DoneEvent, ErrorEvent)
LOGPROB_FLOOR = -9999.0


def to_line(event: Event, job: int | None = None) -> bytes:
    """One event as a UTF-8 JSON line (ending in a newline); `job` tags it with its job's index in a batch."""
    body = event.to_dict() if job is None else {**event.to_dict(), "job": job}
    return (json.dumps(body, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


def is_final(event: Event) -> bool:
    return isinstance(event, FINAL_EVENTS)


def parse_line(line: bytes | str) -> Event:
    """Parse one JSON line written by `to_line`.

    Raises:
        ProtocolError: not JSON, or not one of the three event shapes.
    """
    return _event(_json_object(line))


def parse_job_line(line: bytes | str) -> tuple[int, Event]:
    """Parse one line of a batch stream: (the job's index, its event).

    Raises:
        ProtocolError: not an event, or no non-negative integer "job".
    """
    raw = _json_object(line)
    job = raw.get("job")
    if not isinstance(job, int) or isinstance(job, bool) or job < 0:
        raise ProtocolError(f"a batch event needs a job index, got {job!r}")
    return job, _event(raw)


def _json_object(line: bytes | str) -> dict:
    try:
        raw = json.loads(line)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise ProtocolError(f"not a JSON line: {err}") from None
    if not isinstance(raw, dict):
        raise ProtocolError(f"an event is a JSON object, got {type(raw).__name__}")
    return raw


def _event(raw: dict) -> Event:
    if "text" in raw:
        if not isinstance(raw["text"], str):
            raise ProtocolError("'text' must be a string")
        try:
            tokens = _count(raw, "tokens") if "tokens" in raw else 0
        except TypeError as err:
            raise ProtocolError(str(err)) from None
        return TextEvent(raw["text"], _logprobs(raw.get("logprobs")), tokens)
    if "done" in raw:
        done = raw["done"]
        try:
            return DoneEvent(str(done["finish_reason"]), _count(done, "prompt_tokens"),
                             _count(done, "completion_tokens"), _logprobs(done.get("logprobs")),
                             _logprobs(done.get("prompt_logprobs")))
        except (KeyError, TypeError) as err:
            raise ProtocolError(f"bad 'done' event {done!r}: {err}") from None
    if "error" in raw:
        error = raw["error"]
        if isinstance(error, str):  # the shape workers wrote before this module
            return ErrorEvent(error)
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return ErrorEvent(error["message"], str(error.get("code") or "worker_failed"))
        raise ProtocolError(f"bad 'error' event {error!r}")
    raise ProtocolError(f"unknown event with keys {sorted(raw)}")


def _finite(logprob: float | None) -> float | None:
    """JSON has no -inf: an impossible token is written as OpenAI writes it, -9999.0."""
    return None if logprob is None else max(float(logprob), LOGPROB_FLOOR)


def _count(done: dict, key: str) -> int:
    value = done[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise TypeError(f"{key} must be a non-negative integer, got {value!r}")
    return value


def _logprobs(raw) -> tuple[TokenLogprob, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ProtocolError("'logprobs' must be a list")
    entries = tuple(TokenLogprob.from_dict(entry) for entry in raw)
    for entry in entries:
        if entry.logprob is not None and math.isnan(entry.logprob):
            raise ProtocolError("a logprob is NaN")
    return entries
