"""The OpenAI-compatible API's request and response types: parsing a request into one typed options object,
and building `chat.completion` / `text_completion` objects, stream chunks and server-sent events.

    options, messages = parse_chat_request(body)      # options.sampling: the request's SamplingParams
    options, prompts = parse_completion_request(body)
    chat_response(new_id("chatcmpl"), options.model, choices, usage)

Parsing is explicit: each field is checked for type and range and a failure is an `APIError` naming the field
(`param`). The sampling fields become a `SamplingParams` in one place (`_request_options`), checked against the
one table of sampling limits (`serve.sampling`); what stays here are the request's own limits (choices, prompts,
stop strings per request) and the fields OpenAI has that we do not implement.
"""
from __future__ import annotations

import dataclasses
import json
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Iterator, Mapping, Sequence, Union

from ds_vicuna.chat.messages import Message, MessageError, flatten_openai_message, validate_messages
from ds_vicuna.serve.errors import APIError, ErrorCode
from ds_vicuna.serve.sampling import MAX_SEED, SamplingParams
from ds_vicuna.serve.worker_events import TokenLogprob

MAX_STOP_STRINGS = 4  # per request, as OpenAI allows
MAX_N = 8  # choices per prompt
MAX_PROMPTS = 64  # prompts per text completion request


# ---- request parsing ---------------------------------------------------------------------------------
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
    """One request's options: which model, how many choices, streaming, and its checked sampling settings.

    Attributes:
        sampling: the settings every choice is generated with (choice i's seed is `seed + i`).
        choices: completions requested in all (n per prompt, times the number of prompts).
    """

    model: str
    sampling: SamplingParams
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    choices: int = 1

    def worker_params(self, index: int) -> dict:
        """What one worker job gets for choice `index` (choices get distinct seeds when one was given)."""
        seed = None if self.sampling.seed is None else self.sampling.seed + index
        return dataclasses.replace(self.sampling, seed=seed).to_dict()


def _request_options(body: Mapping, sampling: Mapping, params: Mapping[str, str] | None = None,
                     prompts: int = 1) -> GenerationOptions:
    """The options of a request body; `sampling` holds the endpoint's own sampling fields by option name.

    Args:
        body: the request body.
        sampling: values of the endpoint-specific options (logprobs, top_logprobs, echo), by option name.
        params: the request's field name for an option where it differs from the option's.
        prompts: prompts in the request (each gets `n` choices; the seed range depends on the total).
    """
    model = _field(body, "model", (str,), required=True)
    n = _field(body, "n", (int,), 1)
    if not 1 <= n <= MAX_N:
        raise APIError(ErrorCode.INVALID_VALUE, f"'n' must be an integer in [1, {MAX_N}], got {n}", "n")
    choices = n * prompts
    stop = _field(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > MAX_STOP_STRINGS:
        raise APIError(ErrorCode.INVALID_VALUE, f"'stop' must be a non-empty string or up to {MAX_STOP_STRINGS} "
                       "non-empty strings", "stop")
    tokens_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    raw = {"max_tokens": body.get(tokens_name), "temperature": body.get("temperature"), "top_p": body.get("top_p"),
           "seed": body.get("seed"), "stop": stop, **sampling}
    settings = SamplingParams.from_dict(raw, {"max_tokens": tokens_name, **(params or {})})
    if settings.seed is not None and settings.seed + choices - 1 > MAX_SEED:
        raise APIError(ErrorCode.INVALID_VALUE, f"'seed' must be in [0, {MAX_SEED - (choices - 1)}] (2**63-1 less "
                       f"one per further choice, since choice i uses seed + i), got {settings.seed}", "seed")
    stream = _field(body, "stream", (bool,), False)
    stream_options = _field(body, "stream_options", (dict,), {})
    return GenerationOptions(model, settings, n, stream, bool(stream_options.get("include_usage", False)), choices)


def parse_chat_request(body: Mapping) -> tuple[GenerationOptions, list[Message]]:
    """A /v1/chat/completions body -> options and validated messages.

    Content given as a list of text parts is joined and the `developer` role is read as `system`
    (`ds_vicuna.chat.messages.flatten_openai_message`).

    Raises:
        APIError: a field of the wrong type or range, a field we do not implement, or messages that break the
            conversation rules.
    """
    check_fields(body, CHAT_FIELDS)
    options = _request_options(body, {"logprobs": body.get("logprobs"), "top_logprobs": body.get("top_logprobs")})
    if body.get("top_logprobs") is not None and not options.sampling.logprobs:
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

    Raises:
        APIError: a field of the wrong type or range, or a field we do not implement.
    """
    check_fields(body, COMPLETION_FIELDS)
    prompts = _parse_prompts(_field(body, "prompt", (str, list), required=True))
    top = body.get("logprobs")
    options = _request_options(body, {"logprobs": top is not None, "top_logprobs": top, "echo": body.get("echo")},
                               {"top_logprobs": "logprobs"}, prompts=len(prompts))
    sampling = options.sampling
    if options.stream and sampling.echo and (sampling.logprobs or any(isinstance(p, list) for p in prompts)):
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


def iter_sse(lines: Iterable[bytes]) -> Iterator[dict]:
    """Parse `data: ...` lines of an SSE stream into dicts (stops at [DONE]); for clients and tests."""
    for line in lines:
        if not line or not line.startswith(b"data: "):
            continue
        data = line[len(b"data: "):]
        if data.strip() == b"[DONE]":
            return
        yield json.loads(data)
