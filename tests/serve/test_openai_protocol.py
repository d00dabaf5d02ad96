"""OpenAI request parsing (`serve.openai_protocol`): every bad field is a 400 naming it, before any worker is
used; fields we lack are accepted only at their neutral value; the worker payload follows the contract."""
from __future__ import annotations

import json

import pytest

from ds_vicuna.serve.errors import APIError, ErrorCode
from ds_vicuna.serve.openai_protocol import iter_sse, parse_chat_request, parse_completion_request, sse
from ds_vicuna.serve.sampling import SamplingParams
from tests.support.serve_fakes import CHAT, SECRET, assert_error, ok_worker


def test_a_chat_request_becomes_one_options_object_with_its_sampling_params():
    options, messages = parse_chat_request({**CHAT, "max_completion_tokens": 7, "stop": "###", "n": 2,
                                            "seed": 4, "logprobs": True, "top_logprobs": 1, "stream": True})
    assert options.sampling == SamplingParams(7, 1.0, 1.0, 4, ("###",), True, 1, False)
    assert (options.model, options.n, options.choices, options.stream) == ("m", 2, 2, True)
    assert [m.content for m in messages] == ["hi"]
    assert options.worker_params(1) == {**options.sampling.to_dict(), "seed": 5}
    defaults, _ = parse_chat_request({"model": "m", "messages": CHAT["messages"]})
    assert defaults.sampling == SamplingParams(None)  # the worker picks max_tokens from the room left


def test_a_completion_request_reads_logprobs_as_the_number_of_alternatives():
    options, prompts = parse_completion_request({"model": "m", "prompt": ["a", "b"], "n": 3, "logprobs": 2,
                                                 "echo": True, "max_tokens": 0})
    assert prompts == ["a", "b"] and options.choices == 6
    assert options.sampling == SamplingParams(0, logprobs=True, top_logprobs=2, echo=True)
    with pytest.raises(APIError) as caught:
        parse_completion_request({"model": "m", "prompt": "a", "logprobs": 21})
    assert (caught.value.code, caught.value.param) == (ErrorCode.INVALID_VALUE, "logprobs")
    with pytest.raises(APIError) as caught:
        parse_chat_request({**CHAT, "max_completion_tokens": 0})
    assert caught.value.param == "max_completion_tokens"


def test_sse_lines_read_back():
    raw = sse({"a": "é"}) + sse({"b": 1}) + sse("[DONE]") + sse({"after": "done"})
    assert list(iter_sse(raw.split(b"\n"))) == [{"a": "é"}, {"b": 1}]


@pytest.mark.parametrize("payload,param", [
    ({"prompt": "Say", "max_tokens": 0}, "max_tokens"),  # 0 only with echo
    ({"prompt": [], "max_tokens": 1}, "prompt"),
    ({"prompt": ["a", 1], "max_tokens": 1}, "prompt"),
    ({"prompt": [[1, 2], []], "max_tokens": 1}, "prompt"),
    ({"prompt": [1, -2], "max_tokens": 1}, "prompt"),
    ({"prompt": "Say", "logprobs": 21}, "logprobs"),
    ({"prompt": "Say", "logprobs": True}, "logprobs"),
    ({"prompt": "Say", "top_logprobs": 2}, "top_logprobs"),  # a chat field
    ({"prompt": "Say", "suffix": "!"}, "suffix"),
    ({"prompt": "Say", "best_of": 3}, "best_of"),
    ({"prompt": "Say", "echo": True, "logprobs": 1, "stream": True}, "echo"),
    ({"prompt": [1, 2], "echo": True, "stream": True}, "echo"),
    ({"prompt": ["a", "b"], "n": 2, "seed": 2**63 - 3}, "seed"),  # four choices: seed + 3 > 2**63-1
])
def test_bad_completion_requests_name_the_parameter(stack, payload, param):
    client, http = stack({"http://w1": ok_worker})
    reply = client.post("/v1/completions", json={"model": "m", **payload})
    assert reply.status_code == 400, reply.get_data(as_text=True)
    assert reply.get_json()["error"]["param"] == param
    assert http.calls == []


def test_neutral_values_of_unimplemented_fields_and_openai_message_shapes_are_accepted(stack):
    """What SDKs and LangChain send: defaults of fields we lack, `developer` role, content as text parts."""
    client, http = stack({"http://w1": ok_worker})
    body = {**CHAT, "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "tools": [],
            "response_format": {"type": "text"}, "user": "u-1", "parallel_tool_calls": True, "store": False,
            "messages": [{"role": "developer", "content": "Be brief."},
                         {"role": "user", "content": [{"type": "text", "text": "Hello"},
                                                      {"type": "text", "text": "there"}]},
                         {"role": "assistant", "content": [{"type": "text", "text": "Hi."}]},
                         {"role": "user", "content": "Bye"}]}
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    assert http.payloads[0]["messages"] == [{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "Hello\nthere"},
                                            {"role": "assistant", "content": "Hi."},
                                            {"role": "user", "content": "Bye"}]


def test_worker_params_follow_the_contract(stack):
    client, http = stack({"http://w1": ok_worker})
    body = {**CHAT, "n": 2, "seed": 7, "temperature": 0.5, "top_p": 0.9, "stop": "###", "logprobs": True,
            "top_logprobs": 3}
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    params = sorted((p["params"] for p in http.payloads), key=lambda p: p["seed"])
    assert params == [{"max_tokens": 5, "temperature": 0.5, "top_p": 0.9, "seed": seed, "stop": ["###"],
                       "logprobs": True, "top_logprobs": 3, "echo": False} for seed in (7, 8)]
    assert all(h == {"X-Worker-Secret": SECRET} for h in http.headers)  # workers refuse calls without it


@pytest.mark.parametrize("payload,status,code,param", [
    (b"{not json", 400, "invalid_json", None),
    (b"[1, 2]", 400, "invalid_json", None),
    (b'{"a": ' + b"[" * 10_000 + b"]" * 10_000 + b"}", 400, "invalid_json", None),  # once a RecursionError 500
    (b'{"a": ' + b"[" * 64 + b"]" * 64 + b"}", 400, "invalid_json", None),  # deeper than MAX_JSON_DEPTH
    ({**CHAT, "temperature": "hot"}, 400, "invalid_type", "temperature"),
    ({**CHAT, "temperature": 3}, 400, "invalid_value", "temperature"),
    ({**CHAT, "max_tokens": True}, 400, "invalid_type", "max_tokens"),
    ({**CHAT, "n": 0}, 400, "invalid_value", "n"),
    ({**CHAT, "stop": ["a", 3]}, 400, "invalid_value", "stop"),
    ({**CHAT, "messages": []}, 400, "invalid_messages", "messages"),
    ({**CHAT, "messages": "hi"}, 400, "invalid_type", "messages"),
    ({**CHAT, "messages": [{"role": "robot", "content": "x"}]}, 400, "invalid_messages", "messages"),
    ({"messages": CHAT["messages"]}, 400, "missing_required_parameter", "model"),
    ({**CHAT, "model": "nope"}, 404, "model_not_found", "model"),
    # values that used to pass validation and fail between the API and a worker (or kill its scheduler)
    ({**CHAT, "seed": 2**64}, 400, "invalid_value", "seed"),
    ({**CHAT, "seed": -1}, 400, "invalid_value", "seed"),
    ({**CHAT, "seed": 2**63 - 1, "n": 2}, 400, "invalid_value", "seed"),  # choice 1 would use 2**63
    (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, "invalid_value",
     "temperature"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}', 400, "invalid_value",
     "top_p"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 1e999}', 400,
     "invalid_value", "temperature"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "bad \\ud800 text"}]}', 400, "invalid_value",
     "messages[0].content"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "stop": ["\\udfff"]}', 400,
     "invalid_value", "stop[0]"),
    # fields we do not implement are named, not ignored
    ({**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "unsupported_parameter", "tools"),
    ({**CHAT, "response_format": {"type": "json_object"}}, 400, "unsupported_parameter", "response_format"),
    ({**CHAT, "presence_penalty": 0.5}, 400, "unsupported_parameter", "presence_penalty"),
    ({**CHAT, "logit_bias": {"50256": -100}}, 400, "unsupported_parameter", "logit_bias"),
    ({**CHAT, "frobnicate": 1}, 400, "unsupported_parameter", "frobnicate"),
    ({**CHAT, "echo": True}, 400, "unsupported_parameter", "echo"),  # a completions field
    ({**CHAT, "messages": [{"role": "user", "content": "hi", "tool_calls": []}]}, 400, "unsupported_parameter",
     "messages[0].tool_calls"),
    ({**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "invalid_messages", "messages"),
    ({**CHAT, "messages": [{"role": "tool", "content": "x"}]}, 400, "invalid_messages", "messages"),
    ({**CHAT, "messages": [{"role": "user", "content": [{"type": ["text"], "text": "hi"}]}]}, 400, "invalid_messages",
     "messages"),  # an unhashable part type was a 500
    # logprobs
    ({**CHAT, "top_logprobs": 2}, 400, "invalid_value", "top_logprobs"),  # needs logprobs: true
    ({**CHAT, "logprobs": True, "top_logprobs": 21}, 400, "invalid_value", "top_logprobs"),
    ({**CHAT, "logprobs": 1}, 400, "invalid_type", "logprobs"),
    ({**CHAT, "max_tokens": 0}, 400, "invalid_value", "max_tokens"),  # 0 only for echo on completions
])
def test_bad_requests_get_openai_errors_and_server_keeps_serving(stack, payload, status, code, param):
    client, http = stack({"http://w1": ok_worker})
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    reply = client.post("/v1/chat/completions", data=data, content_type="application/json")
    assert_error(reply, status, code, param)
    assert http.calls == []  # rejected before any worker was used
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
