"""Sampling settings (`serve.sampling`): one table of options and limits, checked by one function, the same for
the API's requests, the worker's "params" and jobs built in code."""
from __future__ import annotations

import ast
import dataclasses
import math
from pathlib import Path

import pytest

from ds_vicuna.serve.errors import APIError, ErrorCode
from ds_vicuna.serve.sampling import (MAX_SEED, MAX_TEMPERATURE, MAX_TOP_LOGPROBS, SAMPLING_OPTIONS, SamplingParams)

SERVE = Path(__file__).resolve().parents[2] / "serve"


def test_the_table_and_the_dataclass_name_the_same_options_with_the_same_defaults():
    fields = {f.name: f.default for f in dataclasses.fields(SamplingParams)}
    assert list(fields) == list(SAMPLING_OPTIONS)
    defaults = {name: option.default for name, option in SAMPLING_OPTIONS.items() if name != "max_tokens"}
    assert defaults == {name: default for name, default in fields.items() if name != "max_tokens"}
    assert SamplingParams.from_dict({}) == SamplingParams(None)


def test_from_dict_checks_types_and_converts_and_round_trips():
    params = SamplingParams.from_dict({"max_tokens": 5, "temperature": 1, "top_p": 0.9, "seed": 3, "stop": ["a"],
                                       "logprobs": True, "top_logprobs": 2, "echo": False, "unknown": "ignored"})
    assert params == SamplingParams(5, 1.0, 0.9, 3, ("a",), True, 2, False)
    assert isinstance(params.temperature, float) and params.stop == ("a",)
    assert params.to_dict()["stop"] == ["a"]  # JSON values for the worker payload
    assert SamplingParams.from_dict(params.to_dict()) == params
    assert SamplingParams.from_dict({"temperature": 0, "max_tokens": 1}).greedy


@pytest.mark.parametrize("name, value", [
    ("max_tokens", 0.5), ("max_tokens", True), ("temperature", "hot"), ("temperature", True), ("seed", 1.0),
    ("stop", "END"), ("logprobs", 1), ("top_logprobs", False), ("echo", "yes"),
])
def test_a_wrong_type_is_invalid_type_naming_the_option(name, value):
    with pytest.raises(APIError) as caught:
        SamplingParams.from_dict({"max_tokens": 1, name: value})
    assert (caught.value.code, caught.value.param) == (ErrorCode.INVALID_TYPE, name)


@pytest.mark.parametrize("name, good, bad", [
    ("max_tokens", 1, -1),
    ("temperature", MAX_TEMPERATURE, MAX_TEMPERATURE + 1e-9),
    ("temperature", 0.0, -1e-9),
    ("temperature", 1.0, math.nan),
    ("top_p", 1.0, 0.0),
    ("top_p", 1e-9, 1.0 + 1e-9),
    ("top_p", 0.5, math.inf),
    ("seed", MAX_SEED, MAX_SEED + 1),
    ("seed", 0, -1),
    ("top_logprobs", MAX_TOP_LOGPROBS, MAX_TOP_LOGPROBS + 1),
    ("stop", ["a", "b"], ["a", ""]),
    ("stop", ("a",), ["a", 3]),
])
def test_each_limit_is_inclusive_and_one_past_it_is_invalid_value(name, good, bad):
    assert getattr(SamplingParams.from_dict({"max_tokens": 1, name: good}), name) == (
        tuple(good) if name == "stop" else good)
    with pytest.raises(APIError) as caught:
        SamplingParams.from_dict({"max_tokens": 1, name: bad})
    assert (caught.value.code, caught.value.param) == (ErrorCode.INVALID_VALUE, name)
    assert name in caught.value.message


def test_errors_name_the_requests_own_field():
    with pytest.raises(APIError) as caught:
        SamplingParams.from_dict({"max_tokens": 1, "top_logprobs": 21}, {"top_logprobs": "logprobs"})
    assert caught.value.param == "logprobs" and "'logprobs'" in caught.value.message


def test_max_tokens_zero_only_with_echo():
    assert SamplingParams.from_dict({"max_tokens": 0, "echo": True, "logprobs": True}).wants_prompt_logprobs
    with pytest.raises(APIError) as caught:
        SamplingParams.from_dict({"max_tokens": 0}, {"max_tokens": "max_completion_tokens"})
    assert (caught.value.code, caught.value.param) == (ErrorCode.INVALID_VALUE, "max_completion_tokens")


def test_validate_checks_settings_built_in_code_through_the_same_table():
    SamplingParams(5, temperature=0.5, seed=MAX_SEED, top_logprobs=MAX_TOP_LOGPROBS).validate()
    for bad, param in ((SamplingParams(5, seed=2 ** 64), "seed"), (SamplingParams(5, temperature=math.nan),
                                                                   "temperature"), (SamplingParams(0), "max_tokens")):
        with pytest.raises(APIError) as caught:
            bad.validate()
        assert (caught.value.code, caught.value.param) == (ErrorCode.INVALID_VALUE, param)


def test_every_sampling_limit_is_defined_only_in_serve_sampling():
    """No second copy of a limit anywhere in serve/ (they used to live in the engine and the schemas both)."""
    limits = {"MAX_SEED", "MAX_TOP_LOGPROBS", "MAX_TEMPERATURE", "DEFAULT_MAX_TOKENS", "GREEDY_BELOW"}
    defined = {}
    for path in sorted(SERVE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Name) and target.id in limits:
                        defined.setdefault(target.id, []).append(path.name)
    assert defined == {name: ["sampling.py"] for name in limits}
