"""Request and response types of the OpenAI-compatible API, and the one error vocabulary every server uses.

Every error any of our servers returns has OpenAI's shape:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature", "code": "invalid_type"}}

Parsing is explicit: each field is checked for type and range and a failure names the field (`param`).
"""
from __future__ import annotations

import enum
import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from ds_vicuna.messages import Message, MessageError, validate_messages

MAX_STOP_STRINGS = 4
MAX_N = 8
DEFAULT_MAX_TOKENS = 256


class ErrorCode(str, enum.Enum):
    """Error codes (OpenAI's where one exists) with their HTTP status and OpenAI error type."""

    INVALID_JSON = "invalid_json"
    INVALID_TYPE = "invalid_type"
    INVALID_VALUE = "invalid_value"
    MISSING_PARAMETER = "missing_required_parameter"
    INVALID_MESSAGES = "invalid_messages"
    MODEL_NOT_FOUND = "model_not_found"
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
    CONTENT_FILTERED = "content_filter"
    INVALID_API_KEY = "invalid_api_key"
    INVALID_WORKER_SECRET = "invalid_worker_secret"
    BODY_TOO_LARGE = "request_too_large"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    QUEUE_FULL = "queue_full"
    NO_WORKER = "no_worker_available"
    WORKER_FAILED = "worker_failed"
    INTERNAL = "internal_error"

    @property
    def status(self) -> int:
        return _STATUS.get(self, 400)

    @property
    def kind(self) -> str:
        """OpenAI's error `type`."""
        return _KIND.get(self, "invalid_request_error")


_STATUS = {ErrorCode.MODEL_NOT_FOUND: 404, ErrorCode.NOT_FOUND: 404, ErrorCode.METHOD_NOT_ALLOWED: 405,
           ErrorCode.INVALID_API_KEY: 401, ErrorCode.INVALID_WORKER_SECRET: 403, ErrorCode.BODY_TOO_LARGE: 413,
           ErrorCode.QUEUE_FULL: 429, ErrorCode.NO_WORKER: 503, ErrorCode.WORKER_FAILED: 502,
           ErrorCode.INTERNAL: 500}
_KIND = {ErrorCode.INVALID_API_KEY: "authentication_error", ErrorCode.INVALID_WORKER_SECRET: "permission_error",
         ErrorCode.QUEUE_FULL: "rate_limit_error", ErrorCode.NO_WORKER: "server_error",
         ErrorCode.WORKER_FAILED: "server_error", ErrorCode.INTERNAL: "server_error",
         ErrorCode.NOT_FOUND: "not_found_error"}


class APIError(Exception):
    """An error to return to the client in OpenAI's shape."""

    def __init__(self, code: ErrorCode, message: str, param: str | None = None):
        super().__init__(message)
        self.code, self.message, self.param = ErrorCode(code), message, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.code.kind, "param": self.param,
                          "code": self.code.value}}

    @classmethod
    def from_body(cls, body: Any, status: int) -> "APIError":
        """Rebuild an error another of our servers returned (unknown shapes become WORKER_FAILED)."""
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict):
            try:
                return cls(ErrorCode(err.get("code")), str(err.get("message")), err.get("param"))
            except ValueError:
                pass
        return cls(ErrorCode.WORKER_FAILED, f"upstream answered HTTP {status}: {str(body)[:200]}")


# ---- request parsing ---------------------------------------------------------------------------------
def parse_json_body(raw: bytes) -> dict:
    """The request body as a JSON object.

    Raises:
        APIError: not JSON, or not an object.
    """
    try:
        body = json.loads(raw.decode("utf-8") if raw else "")
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise APIError(ErrorCode.INVALID_JSON, f"the request body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise APIError(ErrorCode.INVALID_JSON, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _field(body: Mapping, name: str, types: tuple, default: Any = None, required: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        if required:
            raise APIError(ErrorCode.MISSING_PARAMETER, f"you must provide '{name}'", name)
        return default
    if isinstance(value, bool) and bool not in types:  # JSON true is not a number
        raise APIError(ErrorCode.INVALID_TYPE, f"'{name}' must be {_type_words(types)}, got a boolean", name)
    if not isinstance(value, types):
        raise APIError(ErrorCode.INVALID_TYPE, f"'{name}' must be {_type_words(types)}, got "
                       f"{type(value).__name__}", name)
    return value


def _type_words(types: tuple) -> str:
    words = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "an array",
             dict: "an object"}
    return " or ".join(dict.fromkeys(words[t] for t in types if t in words))


def _in_range(name: str, value: float, low: float, high: float, low_open: bool = False) -> float:
    if value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise APIError(ErrorCode.INVALID_VALUE, f"'{name}' must be in {bracket}{low}, {high}], got {value}", name)
    return value


@dataclass
class GenerationOptions:
    """The sampling fields shared by chat and text completions."""

    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False

    def worker_params(self, index: int) -> dict:
        """What one worker job gets for choice `index` (choices get distinct seeds when one was given)."""
        seed = None if self.seed is None else self.seed + index
        return {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p, "seed": seed,
                "stop": self.stop}


def parse_options(body: Mapping) -> GenerationOptions:
    """The shared sampling fields of a request body, type- and range-checked."""
    model = _field(body, "model", (str,), required=True)
    max_tokens = _field(body, "max_completion_tokens", (int,)) or _field(body, "max_tokens", (int,))
    if max_tokens is not None and max_tokens < 1:
        raise APIError(ErrorCode.INVALID_VALUE, f"'max_tokens' must be at least 1, got {max_tokens}", "max_tokens")
    temperature = _in_range("temperature", float(_field(body, "temperature", (int, float), 1.0)), 0.0, 2.0)
    top_p = _in_range("top_p", float(_field(body, "top_p", (int, float), 1.0)), 0.0, 1.0, low_open=True)
    n = int(_in_range("n", _field(body, "n", (int,), 1), 1, MAX_N))
    seed = _field(body, "seed", (int,))
    stop = _field(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in stop):
        raise APIError(ErrorCode.INVALID_VALUE, f"'stop' must be a non-empty string or up to {MAX_STOP_STRINGS} "
                       "non-empty strings", "stop")
    stream = _field(body, "stream", (bool,), False)
    stream_options = _field(body, "stream_options", (dict,), {})
    include_usage = bool(stream_options.get("include_usage", False))
    return GenerationOptions(model, max_tokens, temperature, top_p, n, seed, stop, stream, include_usage)


def parse_chat_request(body: Mapping) -> tuple[GenerationOptions, list[Message]]:
    """A /v1/chat/completions body -> options and validated messages.

    Raises:
        APIError: a field of the wrong type or range, or messages that break the conversation rules.
    """
    options = parse_options(body)
    raw = _field(body, "messages", (list,), required=True)
    try:
        messages = validate_messages(raw, require_final_user=True)
    except MessageError as err:
        raise APIError(ErrorCode.INVALID_MESSAGES, str(err), "messages") from None
    return options, messages


def parse_completion_request(body: Mapping) -> tuple[GenerationOptions, str]:
    """A /v1/completions body -> options and the prompt text (a string or a list holding one string)."""
    options = parse_options(body)
    prompt = _field(body, "prompt", (str, list), required=True)
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            raise APIError(ErrorCode.INVALID_VALUE, "'prompt' must be a string or a list of exactly one string "
                           "(batched prompts: send one request each)", "prompt")
        prompt = prompt[0]
    if not prompt:
        raise APIError(ErrorCode.INVALID_VALUE, "'prompt' must not be empty", "prompt")
    return options, prompt


# ---- responses ------------------------------------------------------------------------------------------
@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def as_dict(self) -> dict:
        return {**asdict(self), "total_tokens": self.prompt_tokens + self.completion_tokens}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def chat_response(rid: str, model: str, choices: list[dict], usage: Usage, created: int | None = None) -> dict:
    """A `chat.completion` object; each choice dict has index, text and finish_reason."""
    return {"id": rid, "object": "chat.completion", "created": created or int(time.time()), "model": model,
            "choices": [{"index": c["index"], "message": {"role": "assistant", "content": c["text"]},
                         "finish_reason": c["finish_reason"]} for c in choices],
            "usage": usage.as_dict()}


def chat_chunk(rid: str, model: str, created: int, index: int, delta: dict, finish_reason: str | None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason}]}


def completion_response(rid: str, model: str, choices: list[dict], usage: Usage, created: int | None = None) -> dict:
    """A `text_completion` object."""
    return {"id": rid, "object": "text_completion", "created": created or int(time.time()), "model": model,
            "choices": [{"index": c["index"], "text": c["text"], "logprobs": None,
                         "finish_reason": c["finish_reason"]} for c in choices],
            "usage": usage.as_dict()}


def completion_chunk(rid: str, model: str, created: int, index: int, text: str, finish_reason: str | None) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}]}


def usage_chunk(rid: str, obj: str, model: str, created: int, usage: Usage) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": usage.as_dict()}


def model_list(names: list[str]) -> dict:
    return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "ds-vicuna"}
                                       for n in sorted(names)]}


def sse(payload: dict | str) -> bytes:
    """One server-sent event line."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode("utf-8")
