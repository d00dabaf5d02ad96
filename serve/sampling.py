"""Sampling settings of one generation: `SamplingParams` and THE table of options with their types and limits.

    params = SamplingParams.from_dict({"max_tokens": 64, "temperature": 0.7, "seed": 1})   # checked
    params.to_dict()   # what the API sends a worker as "params"

Every limit is defined once, here (`SAMPLING_OPTIONS`), and checked by one function (`SamplingOption.check`).
The API turns an OpenAI request into a `SamplingParams` with `from_dict` (naming its own fields in errors),
the worker turns the "params" of its request body into one the same way, and the engine re-asserts the
invariants of a job handed to it directly (`validate`), always through the same table.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

from ds_vicuna.serve.errors import APIError, ErrorCode

MAX_SEED = 2 ** 63 - 1  # torch.Generator.manual_seed takes at most a signed 64-bit integer
MAX_TOP_LOGPROBS = 20  # alternatives per position, as OpenAI allows
MAX_TEMPERATURE = 2.0  # OpenAI's range
DEFAULT_MAX_TOKENS = 256  # when a request gives none (capped by the room left in the context)
GREEDY_BELOW = 1e-5  # temperatures this small are greedy (dividing logits by them overflows to inf/NaN)


@dataclass(frozen=True)
class SamplingOption:
    """One sampling option: its value type, default and range.

    Attributes:
        name: the field of `SamplingParams`.
        kind: `int`, `float`, `bool` or `list` (a list of non-empty strings).
        default: the value when a request leaves it out (or sends null).
        low, high: the inclusive range of a number (None: unbounded).
        low_open: `low` itself is excluded.
        nullable: None is a value of its own (not replaced by the default).
    """

    name: str
    kind: type
    default: Any
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    nullable: bool = False

    def check(self, value: Any, param: str | None = None) -> Any:
        """`value` if it has the right type and range (ints widened to float for a float option).

        Args:
            value: the value given.
            param: the name to give in an error (the request's field name; default `name`).

        Raises:
            APIError: INVALID_TYPE for a wrong type, INVALID_VALUE for a value out of range, naming `param`.
        """
        param = param or self.name
        if value is None and self.nullable:
            return None
        types = {int: (int,), float: (int, float), bool: (bool,), list: (list, tuple)}[self.kind]
        if not isinstance(value, types) or (isinstance(value, bool) and self.kind is not bool):
            got = "a boolean" if isinstance(value, bool) else type(value).__name__
            raise APIError(ErrorCode.INVALID_TYPE, f"'{param}' must be {_KIND_WORDS[self.kind]}, got {got}", param)
        if self.kind is list:
            if not all(isinstance(item, str) and item for item in value):
                raise APIError(ErrorCode.INVALID_VALUE, f"'{param}' must be a list of non-empty strings", param)
            return tuple(value)
        if self.kind in (int, float) and not self._in_range(value):
            raise APIError(ErrorCode.INVALID_VALUE, f"'{param}' must be {self.range_words()}, got {value!r}", param)
        return float(value) if self.kind is float else value

    def range_words(self) -> str:
        """The allowed values in words, e.g. "a finite number in (0.0, 1.0]" or "an integer >= 0"."""
        what = "an integer" if self.kind is int else "a finite number"
        if self.high is None:
            return what if self.low is None else f"{what} {'>' if self.low_open else '>='} {self.low!r}"
        return f"{what} in {'(' if self.low_open else '['}{self.low!r}, {self.high!r}]"

    def _in_range(self, value) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or value <= self.high


_KIND_WORDS = {int: "an integer", float: "a number", bool: "a boolean", list: "a list of strings"}


# THE table: every sampling option, its default and its limits.
SAMPLING_OPTIONS: dict[str, SamplingOption] = {option.name: option for option in (
    SamplingOption("max_tokens", int, None, low=0, nullable=True),  # None: the worker picks DEFAULT_MAX_TOKENS
    SamplingOption("temperature", float, 1.0, low=0.0, high=MAX_TEMPERATURE),
    SamplingOption("top_p", float, 1.0, low=0.0, high=1.0, low_open=True),
    SamplingOption("seed", int, None, low=0, high=MAX_SEED, nullable=True),
    SamplingOption("stop", list, ()),
    SamplingOption("logprobs", bool, False),
    SamplingOption("top_logprobs", int, 0, low=0, high=MAX_TOP_LOGPROBS),
    SamplingOption("echo", bool, False),
)}


@dataclass
class SamplingParams:
    """Per-request generation settings (their types and limits: `SAMPLING_OPTIONS`).

    Attributes:
        max_tokens: new tokens at most; 0 only prefills (prompt scoring with `echo`); None until the worker
            picks it from the room left in the context (`DEFAULT_MAX_TOKENS` at most).
        temperature: 0 (or below `GREEDY_BELOW`) is greedy.
        top_p: nucleus sampling mass in (0, 1].
        seed: seeds the row's own generator (0..MAX_SEED); None draws one.
        stop: texts that end the reply (never part of it).
        logprobs: report each generated token's logprob.
        top_logprobs: with `logprobs`, the most likely alternatives per position (0..MAX_TOP_LOGPROBS).
        echo: with `logprobs`, also score every prompt token (`DoneEvent.prompt_logprobs`).
    """

    max_tokens: int | None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    echo: bool = False

    @classmethod
    def from_dict(cls, raw: Mapping, params: Mapping[str, str] | None = None) -> "SamplingParams":
        """Checked settings from a mapping of option name -> value; missing or null values take the default.

        Args:
            raw: values by option name (other keys are ignored).
            params: the request's name for an option where it differs (e.g. {"top_logprobs": "logprobs"}),
                so an error names the field the client sent.

        Raises:
            APIError: the first option of a wrong type or out of range, or `max_tokens` 0 without `echo`.
        """
        if not isinstance(raw, Mapping):
            raise APIError(ErrorCode.INVALID_TYPE, "'params' must be an object", "params")
        params = params or {}
        values = {}
        for name, option in SAMPLING_OPTIONS.items():
            value = raw.get(name)
            values[name] = option.default if value is None else option.check(value, params.get(name))
        out = cls(**values)
        out._check_combination(params.get("max_tokens"))
        return out

    def validate(self) -> None:
        """Check every field against `SAMPLING_OPTIONS` (for settings built in code, not by `from_dict`).

        Raises:
            APIError: INVALID_TYPE or INVALID_VALUE naming the first bad field.
        """
        for name, option in SAMPLING_OPTIONS.items():
            option.check(getattr(self, name))
        self._check_combination()

    def _check_combination(self, max_tokens_param: str | None = None) -> None:
        if self.max_tokens == 0 and not self.echo:
            name = max_tokens_param or "max_tokens"
            raise APIError(ErrorCode.INVALID_VALUE, f"'{name}' must be at least 1 (0 is allowed only with 'echo', "
                           "to score a prompt)", name)

    def to_dict(self) -> dict:
        """The settings as JSON values (what the API sends a worker as "params")."""
        return {**dataclasses.asdict(self), "stop": list(self.stop)}

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.echo and self.logprobs
