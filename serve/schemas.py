"""Request and response types of the OpenAI-compatible API, and the one error vocabulary every server uses.

Every error any of our servers returns has OpenAI's shape:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature", "code": "invalid_type"}}

Parsing is explicit: each field is checked for type and range and a failure names the field (`param`).
"""
from __future__ import annotations

import enum
import json
import math
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence, Union

from ds_vicuna.chat.messages import Message, MessageError, flatten_openai_message, validate_messages
from ds_vicuna.serve.protocol import TokenLogprob

MAX_STOP_STRINGS = 4
MAX_N = 8
MAX_PROMPTS = 64
MAX_TOP_LOGPROBS = 20
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes at most a signed 64-bit integer
DEFAULT_MAX_TOKENS = 256


class ErrorCode(str, enum.Enum):
    """Error codes (OpenAI's where one exists) with their HTTP status and OpenAI error type."""

    INVALID_JSON = "invalid_json"
    INVALID_TYPE = "invalid_type"
    INVALID_VALUE = "invalid_value"
    MISSING_PARAMETER = "missing_required_parameter"
    UNSUPPORTED_PARAMETER = "unsupported_parameter"
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
    CLIENT_CLOSED = "client_closed_request"
    INTERNAL = "internal_error"

    @property
    def status(self) -> int:
        return _STATUS.get(self, 400)

    @property
    def kind(self) -> str:
        """OpenAI's error `type`."""
        return _KIND.get(self, "invalid_request_error")

    @property
    def retry_after(self) -> int | None:
        """Seconds a client should wait before retrying (the `Retry-After` header), for the errors that pass."""
        return RETRY_AFTER_S if self in (ErrorCode.QUEUE_FULL, ErrorCode.NO_WORKER) else None


RETRY_AFTER_S = 1
_STATUS = {ErrorCode.MODEL_NOT_FOUND: 404, ErrorCode.NOT_FOUND: 404, ErrorCode.METHOD_NOT_ALLOWED: 405,
           ErrorCode.INVALID_API_KEY: 401, ErrorCode.INVALID_WORKER_SECRET: 403, ErrorCode.BODY_TOO_LARGE: 413,
           ErrorCode.QUEUE_FULL: 429, ErrorCode.NO_WORKER: 503, ErrorCode.WORKER_FAILED: 502,
           ErrorCode.CLIENT_CLOSED: 499, ErrorCode.INTERNAL: 500}
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

    def headers(self) -> dict:
        """HTTP headers that go with the error: `Retry-After` on 429 and 503, which clients retry."""
        wait = self.code.retry_after
        return {} if wait is None else {"Retry-After": str(wait)}

    @classmethod
    def from_body(cls, body: Any, status: int) -> "APIError":
        """Rebuild an error another of our servers returned (unknown shapes become WORKER_FAILED)."""
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict):
            try:
                return cls(ErrorCode(err.get("code")), str(err.get("message")), err.get("param"))
            except ValueError:
                pass
        return cls(ErrorCode.WORKER_FAILED, f"an upstream server answered HTTP {status}")


# ---- request parsing ---------------------------------------------------------------------------------
def parse_json_body(raw: bytes) -> dict:
    """The request body as a JSON object whose every string can be encoded as UTF-8.

    Raises:
        APIError: not JSON, not an object, or a string holding a lone surrogate (`"\\ud800"`), naming where.
    """
    try:
        body = json.loads(raw.decode("utf-8") if raw else "")
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise APIError(ErrorCode.INVALID_JSON, f"the request body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise APIError(ErrorCode.INVALID_JSON, f"the request body must be a JSON object, got {type(body).__name__}")
    bad = _unencodable_text(body)
    if bad is not None:
        raise APIError(ErrorCode.INVALID_VALUE, f"'{bad}' holds text that cannot be encoded as UTF-8 (a lone "
                       "surrogate such as \\ud800); send valid Unicode", bad)
    return body


def _unencodable_text(value: Any, path: str = "") -> str | None:
    """The path (`messages[0].content`) of the first string or key that is not valid Unicode, or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            bad = _unencodable_text(key, where) or _unencodable_text(item, where)
            if bad is not None:
                return bad
    elif isinstance(value, list):
        for i, item in enumerate(value):
            bad = _unencodable_text(item, f"{path}[{i}]")
            if bad is not None:
                return bad
    return None


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
    """`value` if finite and inside the range (JSON `NaN`/`Infinity` and 1e999 are rejected by name)."""
    if not math.isfinite(value) or value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise APIError(ErrorCode.INVALID_VALUE, f"'{name}' must be a finite number in {bracket}{low}, {high}], "
                       f"got {value}", name)
    return value


# ---- which fields a request may carry ------------------------------------------------------------------
COMMON_FIELDS = frozenset({"model", "max_tokens", "temperature", "top_p", "n", "seed", "stop", "stream",
                           "stream_options", "logprobs", "user"})  # `user` only tags a request: nothing to do
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "top_logprobs"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "echo"}
# OpenAI fields we do not implement: accepted only at the value that means "off", otherwise a 400 naming them.
NEUTRAL_VALUES: dict[str, tuple] = {
    "presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": ({},), "tools": ([],), "functions": ([],),
    "tool_choice": ("none",), "function_call": ("none",), "parallel_tool_calls": (True, False),
    "response_format": ({"type": "text"},), "best_of": (1,), "suffix": ("",), "store": (False,),
    "metadata": ({},), "service_tier": ("auto", "default"), "modalities": (["text"],), "reasoning_effort": (),
    "prediction": (), "audio": (), "web_search_options": (),
}
MESSAGE_FIELDS = frozenset({"role", "content"})


def check_fields(body: Mapping, allowed: frozenset) -> None:
    """Reject fields this server does not implement, instead of silently ignoring what the client asked for.

    Raises:
        APIError: UNSUPPORTED_PARAMETER naming the first such field.
    """
    for name, value in body.items():
        if name in allowed or value is None:
            continue
        if name in NEUTRAL_VALUES:
            # `false` is not 0 here: JSON booleans and numbers are different values
            if any(value == neutral and isinstance(value, bool) == isinstance(neutral, bool)
                   for neutral in NEUTRAL_VALUES[name]):
                continue
            raise APIError(ErrorCode.UNSUPPORTED_PARAMETER, f"'{name}' is not supported by this server (got "
                           f"{json.dumps(value)[:80]}); remove it or send its default", name)
        raise APIError(ErrorCode.UNSUPPORTED_PARAMETER, f"unrecognized request argument supplied: '{name}'", name)


# ---- options shared by chat and text completions ----------------------------------------------------------
@dataclass
class GenerationOptions:
    """The sampling fields shared by chat and text completions.

    Attributes:
        choices: completions requested in all (n per prompt, times the number of prompts).
        logprobs: return each generated token's log-probability; `top_logprobs` alternatives with each.
        echo: (text completions) put the prompt in front of the reply, and its tokens in front of `logprobs`.
    """

    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    echo: bool = False
    choices: int = 1

    def worker_params(self, index: int) -> dict:
        """What one worker job gets for choice `index` (choices get distinct seeds when one was given)."""
        seed = None if self.seed is None else self.seed + index
        return {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p, "seed": seed,
                "stop": self.stop, "logprobs": self.logprobs, "top_logprobs": self.top_logprobs,
                "echo": self.echo}


def parse_options(body: Mapping, prompts: int = 1) -> GenerationOptions:
    """The shared sampling fields of a request body, type- and range-checked (`prompts`: for the seed range)."""
    model = _field(body, "model", (str,), required=True)
    tokens_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _field(body, tokens_name, (int,))
    if max_tokens is not None and max_tokens < 0:
        raise APIError(ErrorCode.INVALID_VALUE, f"'{tokens_name}' must be at least 1, got {max_tokens}",
                       tokens_name)
    temperature = _in_range("temperature", float(_field(body, "temperature", (int, float), 1.0)), 0.0, 2.0)
    top_p = _in_range("top_p", float(_field(body, "top_p", (int, float), 1.0)), 0.0, 1.0, low_open=True)
    n = int(_in_range("n", _field(body, "n", (int,), 1), 1, MAX_N))
    choices = n * prompts
    seed = _field(body, "seed", (int,))
    if seed is not None and not 0 <= seed <= MAX_SEED - (choices - 1):
        raise APIError(ErrorCode.INVALID_VALUE, f"'seed' must be in [0, {MAX_SEED - (choices - 1)}] (2**63-1 less "
                       f"one per further choice, since choice i uses seed + i), got {seed}", "seed")
    stop = _field(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in stop):
        raise APIError(ErrorCode.INVALID_VALUE, f"'stop' must be a non-empty string or up to {MAX_STOP_STRINGS} "
                       "non-empty strings", "stop")
    stream = _field(body, "stream", (bool,), False)
    stream_options = _field(body, "stream_options", (dict,), {})
    include_usage = bool(stream_options.get("include_usage", False))
    return GenerationOptions(model, max_tokens, temperature, top_p, n, seed, stop, stream, include_usage,
                             choices=choices)


def _require_some_tokens(options: GenerationOptions, body: Mapping) -> None:
    if options.max_tokens == 0 and not options.echo:
        name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        raise APIError(ErrorCode.INVALID_VALUE, f"'{name}' must be at least 1 (0 is allowed only with 'echo', "
                       "to score a prompt)", name)


def parse_chat_request(body: Mapping) -> tuple[GenerationOptions, list[Message]]:
    """A /v1/chat/completions body -> options and validated messages.

    Content given as a list of text parts is joined and the `developer` role is read as `system`
    (`ds_vicuna.chat.messages.flatten_openai_message`).

    Raises:
        APIError: a field of the wrong type or range, a field we do not implement, or messages that break the
            conversation rules.
    """
    check_fields(body, CHAT_FIELDS)
    options = parse_options(body)
    _require_some_tokens(options, body)
    options.logprobs = _field(body, "logprobs", (bool,), False)
    top = _field(body, "top_logprobs", (int,))
    if top is not None:
        options.top_logprobs = int(_in_range("top_logprobs", top, 0, MAX_TOP_LOGPROBS))
        if not options.logprobs:
            raise APIError(ErrorCode.INVALID_VALUE, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
    raw = _field(body, "messages", (list,), required=True)
    flat = []
    for i, message in enumerate(raw):
        extra = sorted(set(message) - MESSAGE_FIELDS) if isinstance(message, dict) else []
        if extra:
            where = f"messages[{i}].{extra[0]}"
            raise APIError(ErrorCode.UNSUPPORTED_PARAMETER, f"'{where}' is not supported by this server (messages "
                           "carry only 'role' and 'content')", where)
        try:
            flat.append(flatten_openai_message(message, f"messages[{i}]"))
        except MessageError as err:
            raise APIError(ErrorCode.INVALID_MESSAGES, str(err), "messages") from None
    try:
        messages = validate_messages(flat, require_final_user=True)
    except MessageError as err:
        raise APIError(ErrorCode.INVALID_MESSAGES, str(err), "messages") from None
    return options, messages


Prompt = Union[str, list]  # the text, or its token ids


def parse_completion_request(body: Mapping) -> tuple[GenerationOptions, list[Prompt]]:
    """A /v1/completions body -> options and its prompts, each a string or a list of token ids.

    `prompt` may be a string, a list of strings, a list of token ids or a list of such lists, as in OpenAI's API;
    each prompt gets `n` choices (choice `i * n + j` is prompt i's j-th). `logprobs` is the number of alternatives
    to return with each token (0 for the chosen token alone); with `echo` the prompt's tokens come first.
    """
    check_fields(body, COMPLETION_FIELDS)
    prompts = _parse_prompts(_field(body, "prompt", (str, list), required=True))
    options = parse_options(body, prompts=len(prompts))
    options.echo = _field(body, "echo", (bool,), False)
    _require_some_tokens(options, body)
    top = _field(body, "logprobs", (int,))
    if top is not None:
        options.logprobs, options.top_logprobs = True, int(_in_range("logprobs", top, 0, MAX_TOP_LOGPROBS))
    if options.stream and options.echo and (options.logprobs or any(isinstance(p, list) for p in prompts)):
        raise APIError(ErrorCode.UNSUPPORTED_PARAMETER, "streaming with 'echo' is supported for text prompts "
                       "without 'logprobs' only (the prompt's log-probabilities come at the end of the job); "
                       "send 'stream': false", "echo")
    return options, prompts


def _parse_prompts(prompt: Prompt) -> list[Prompt]:
    def is_ids(value) -> bool:
        return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)

    if isinstance(prompt, str) or (is_ids(prompt) and prompt):
        prompts = [prompt]
    elif prompt and (all(isinstance(p, str) for p in prompt) or all(is_ids(p) for p in prompt)):
        prompts = list(prompt)
    else:
        raise APIError(ErrorCode.INVALID_VALUE, "'prompt' must be a string, a list of strings, a list of token ids "
                       "or a list of lists of token ids", "prompt")
    if len(prompts) > MAX_PROMPTS:
        raise APIError(ErrorCode.INVALID_VALUE, f"at most {MAX_PROMPTS} prompts per request, got {len(prompts)}",
                       "prompt")
    for i, p in enumerate(prompts):
        if not p:
            raise APIError(ErrorCode.INVALID_VALUE, f"prompt {i} is empty", "prompt")
        if isinstance(p, list) and min(p) < 0:
            raise APIError(ErrorCode.INVALID_VALUE, f"prompt {i} holds a negative token id", "prompt")
    return prompts


# ---- responses ------------------------------------------------------------------------------------------
@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def as_dict(self) -> dict:
        return {**asdict(self), "total_tokens": self.prompt_tokens + self.completion_tokens}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _token_bytes(text: str) -> list[int]:
    return list(text.encode("utf-8", "replace"))


def chat_logprobs(tokens: Sequence[TokenLogprob]) -> dict:
    """A chat choice's `logprobs` object: one entry per token with its `top_logprobs` alternatives."""
    return {"content": [{"token": t.token, "logprob": t.logprob, "bytes": _token_bytes(t.token),
                         "top_logprobs": [{"token": token, "logprob": logprob, "bytes": _token_bytes(token)}
                                          for token, logprob in t.top]} for t in tokens],
            "refusal": None}


def completion_logprobs(tokens: Sequence[TokenLogprob], offset: int = 0) -> dict:
    """A text completion choice's legacy `logprobs` object; `text_offset` counts characters from `offset`.

    As in OpenAI's API, `top_logprobs` at each position also holds the chosen token, so it has up to
    `logprobs + 1` entries; a prompt's first token (nothing predicts it) has `null` logprob and alternatives.
    """
    out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for t in tokens:
        out["tokens"].append(t.token)
        out["token_logprobs"].append(t.logprob)
        out["top_logprobs"].append(None if t.logprob is None else {**dict(t.top), t.token: t.logprob})
        out["text_offset"].append(offset)
        offset += len(t.token)
    return out


@dataclass
class Choice:
    """One finished choice: its text, why it ended, and its `logprobs` object (already in the endpoint's shape)."""

    index: int
    text: str
    finish_reason: str
    logprobs: dict | None = None


def chat_response(rid: str, model: str, choices: list[Choice], usage: Usage, created: int | None = None) -> dict:
    """A `chat.completion` object."""
    return {"id": rid, "object": "chat.completion", "created": created or int(time.time()), "model": model,
            "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                         "logprobs": c.logprobs, "finish_reason": c.finish_reason} for c in choices],
            "usage": usage.as_dict()}


def chat_chunk(rid: str, model: str, created: int, index: int, delta: dict, finish_reason: str | None,
               logprobs: dict | None = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}


def completion_response(rid: str, model: str, choices: list[Choice], usage: Usage,
                        created: int | None = None) -> dict:
    """A `text_completion` object."""
    return {"id": rid, "object": "text_completion", "created": created or int(time.time()), "model": model,
            "choices": [{"index": c.index, "text": c.text, "logprobs": c.logprobs,
                         "finish_reason": c.finish_reason} for c in choices],
            "usage": usage.as_dict()}


def completion_chunk(rid: str, model: str, created: int, index: int, text: str, finish_reason: str | None,
                     logprobs: dict | None = None) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}


def usage_chunk(rid: str, obj: str, model: str, created: int, usage: Usage) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": usage.as_dict()}


def model_list(names: list[str]) -> dict:
    return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "ds-vicuna"}
                                       for n in sorted(names)]}


def sse(payload: dict | str) -> bytes:
    """One server-sent event line."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode("utf-8")
