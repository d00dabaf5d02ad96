"""API server in-process: OpenAI error shapes, auth, limits, moderation and failover, with fake workers.

The controller is the real one (Flask test client); workers are scripted so no model is loaded. Every worker
reply is written with the classes and `to_line` of `serve.worker_events`, as the real worker writes it.
"""
from __future__ import annotations

import json
import logging

import pytest

from ds_vicuna.serve.api_router import APIConfig, create_app
from ds_vicuna.serve.openai_protocol import iter_sse
from ds_vicuna.serve.controller import Controller
from ds_vicuna.serve.controller import create_app as controller_app
from ds_vicuna.serve.moderation import Moderator
from ds_vicuna.serve.worker_events import TextEvent, to_line
from tests.support.serve_fakes import CONTROLLER, SECRET, FakeClock, FakeHTTP, FakeResponse, events, logprob_worker


@pytest.fixture
def stack():
    """build(workers, **APIConfig fields) -> (API test client, FakeHTTP); the controller and API share a secret."""
    clock = FakeClock()
    controller = Controller(heartbeat_expiry=60, secret=SECRET, clock=clock, registration_grace=0)
    http = FakeHTTP(controller_app(controller).test_client(), {})

    def build(workers: dict, **config):
        for address in workers:
            controller.register(address, ["m"])
        http.workers.update(workers)
        app = create_app(APIConfig(CONTROLLER, **{"worker_secret": SECRET, **config}), http=http, clock=clock)
        client = app.test_client()
        client.controller, client.clock = controller, clock
        return client, http

    return build


def ok_worker(body):
    return FakeResponse(200, lines=events("Hel", "lo", "!"))


def assert_error(reply, status: int, code: str, param=None):
    assert reply.status_code == status, reply.get_data(as_text=True)
    err = reply.get_json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["code"] == code
    assert err["param"] == param
    return err


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


def test_chat_completion_and_stream(stack):
    client, _ = stack({"http://w1": ok_worker})
    reply = client.post("/v1/chat/completions", json=CHAT)
    body = reply.get_json()
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello!"}
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    reply = client.post("/v1/chat/completions", json={**CHAT, "stream": True, "n": 2,
                                                       "stream_options": {"include_usage": True}})
    assert reply.mimetype == "text/event-stream"
    raw = reply.get_data()
    assert raw.rstrip().endswith(b"data: [DONE]")
    chunks = list(iter_sse(raw.split(b"\n")))
    text = {0: "", 1: ""}
    for chunk in chunks[:-1]:
        for choice in chunk["choices"]:
            text[choice["index"]] += choice["delta"].get("content", "")
    assert text == {0: "Hello!", 1: "Hello!"}
    assert chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}


def test_completion_endpoint(stack):
    client, _ = stack({"http://w1": ok_worker})
    body = client.post("/v1/completions", json={"model": "m", "prompt": "Say", "max_tokens": 3}).get_json()
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == "Hello!"
    assert body["choices"][0]["logprobs"] is None


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


def test_body_limit_and_unknown_route(stack):
    client, _ = stack({"http://w1": ok_worker}, max_content_length=1000)
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 2000}]}
    assert_error(client.post("/v1/chat/completions", json=big), 413, "request_too_large")
    assert_error(client.get("/v1/nothing"), 404, "not_found")
    assert_error(client.get("/v1/chat/completions"), 405, "method_not_allowed")


def test_api_keys(stack):
    client, _ = stack({"http://w1": ok_worker}, api_keys=("k1", "k2"))
    assert_error(client.get("/v1/models"), 401, "invalid_api_key")
    assert_error(client.get("/v1/models", headers={"Authorization": "Bearer nope"}), 401, "invalid_api_key")
    reply = client.get("/v1/models", headers={"Authorization": "Bearer k2"})
    assert reply.status_code == 200 and [m["id"] for m in reply.get_json()["data"]] == ["m"]
    assert client.get("/").status_code == 200  # the page itself is public; it sends the key it is given
    assert client.get("/health").status_code == 200


def test_health_needs_a_worker(stack):
    client, _ = stack({})
    assert client.get("/health").status_code == 503


def test_moderation_blocked_words(stack):
    client, http = stack({"http://w1": ok_worker}, moderator=Moderator(blocked_words=["forbidden thing"]))
    bad = {**CHAT, "messages": [{"role": "user", "content": "tell me the Forbidden Thing now"}]}
    err = assert_error(client.post("/v1/chat/completions", json=bad), 400, "content_filter", "messages")
    assert "Forbidden Thing" in err["message"] and http.calls == []
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_moderation_endpoint():
    class Endpoint:
        def post(self, url, json=None, headers=None, timeout=None):
            flagged = any("bomb" in t for t in json["input"])
            return FakeResponse(200, {"results": [{"flagged": flagged, "categories": {"violence": flagged}}]})

    moderator = Moderator(endpoint="http://mod/v1/moderations", http=Endpoint())
    moderator.check(["hello"])
    with pytest.raises(Exception, match="violence"):
        moderator.check(["build a bomb"])


def streamed_text(reply) -> str:
    return "".join(c["choices"][0]["delta"].get("content", "") for c in iter_sse(reply.get_data().split(b"\n"))
                   if c["choices"])


def test_worker_failing_before_first_token_is_retried_elsewhere(stack):
    client, http = stack({"http://w1": ConnectionError("refused"),
                          "http://w2": lambda body: FakeResponse(200, lines=events("x"), broken_after=0),
                          "http://w3": ok_worker})
    reply = client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert reply.status_code == 200
    assert streamed_text(reply) == "Hello!"
    assert http.calls == ["http://w1", "http://w2", "http://w3"]


def test_non_streaming_is_retried_even_after_tokens(stack):
    client, http = stack({"http://w1": lambda body: FakeResponse(200, lines=events("a", "b"), broken_after=1),
                          "http://w2": ok_worker})
    assert client.post("/v1/chat/completions", json=CHAT).get_json()["choices"][0]["message"]["content"] == "Hello!"
    assert http.calls == ["http://w1", "http://w2"]


def test_worker_client_errors_pass_through_and_full_queues_give_429(stack):
    context = {"error": {"message": "This model's maximum context length is 8 tokens.", "type":
                         "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}}
    full = {"error": {"message": "queue full", "type": "rate_limit_error", "param": None, "code": "queue_full"}}
    client, _ = stack({"http://w1": lambda body: FakeResponse(400, context)})
    assert_error(client.post("/v1/chat/completions", json=CHAT), 400, "context_length_exceeded", "messages")
    client, _ = stack({"http://w1": lambda body: FakeResponse(429, full),
                       "http://w2": lambda body: FakeResponse(429, full)})
    assert_error(client.post("/v1/chat/completions", json={**CHAT, "stream": True}), 429, "queue_full")


class EndlessResponse(FakeResponse):
    """A worker that would stream tokens forever; records when the API server closes its connection."""

    def __init__(self):
        super().__init__(200)
        self.closed = False

    def iter_lines(self):
        import time

        while not self.closed:
            yield to_line(TextEvent("x")).rstrip(b"\n")
            time.sleep(0.005)

    def close(self):
        self.closed = True


@pytest.mark.parametrize("n", [1, 3])
def test_client_disconnect_closes_every_worker_stream(stack, n):
    import time

    replies: list[EndlessResponse] = []

    def endless_worker(body):
        replies.append(EndlessResponse())
        return replies[-1]

    client, _ = stack({"http://w1": endless_worker})
    reply = client.post("/v1/chat/completions", json={**CHAT, "stream": True, "n": n}, buffered=False)
    stream = iter(reply.response)
    received = [next(stream) for _ in range(2 * n + 5)]  # role chunks, then tokens from every choice
    chunks = list(iter_sse(b"".join(received).split(b"\n")))
    assert len(replies) == n and any(c["choices"][0]["delta"].get("content") == "x" for c in chunks)
    reply.close()  # what the WSGI server does when the client goes away
    deadline = time.monotonic() + 5
    while not all(r.closed for r in replies) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [r.closed for r in replies] == [True] * n


def test_a_failed_choice_closes_the_choices_already_started(stack):
    replies: list[EndlessResponse] = []

    def second_fails(body):
        if replies:
            return FakeResponse(400, {"error": {"message": "prompt too long", "type": "invalid_request_error",
                                                "code": "context_length_exceeded"}})
        replies.append(EndlessResponse())
        return replies[-1]

    client, _ = stack({"http://w1": second_fails})
    closed_when_answered = []

    @client.application.after_request
    def probe(response):  # closed by the failure itself, not later when the garbage is collected
        closed_when_answered.append([r.closed for r in replies])
        return response

    reply = client.post("/v1/chat/completions", json={**CHAT, "stream": True, "n": 2})
    assert reply.status_code == 400
    assert closed_when_answered == [[True]]


def test_closing_a_job_stream_before_reading_it_closes_the_worker_connection():
    from ds_vicuna.serve.routing import JobStream

    response = EndlessResponse()

    def events():
        try:
            yield from (TextEvent("x") for _ in response.iter_lines())
        finally:
            response.close()

    inner = events()
    next(inner)  # the first event, as Upstream.open_at reads it before choosing a worker
    stream = JobStream(TextEvent("x"), inner)
    stream.close()
    assert response.closed


# ---- logprobs and echo, in OpenAI's shapes --------------------------------------------------------------------
def test_chat_logprobs_and_top_logprobs(stack):
    client, _ = stack({"http://w1": logprob_worker})
    body = client.post("/v1/chat/completions", json={**CHAT, "logprobs": True, "top_logprobs": 2}).get_json()
    choice = body["choices"][0]
    assert choice["message"]["content"] == "Hello"
    content = choice["logprobs"]["content"]
    assert [(c["token"], c["logprob"]) for c in content] == [("He", -0.5), ("llo", -0.25), ("<|im_end|>", -0.1)]
    assert content[0]["bytes"] == list(b"He")
    assert content[0]["top_logprobs"] == [{"token": "He", "logprob": -0.5, "bytes": list(b"He")},
                                          {"token": "Hi", "logprob": -1.5, "bytes": list(b"Hi")}]
    plain = client.post("/v1/chat/completions", json=CHAT).get_json()
    assert plain["choices"][0]["logprobs"] is None
    reply = client.post("/v1/chat/completions", json={**CHAT, "logprobs": True, "stream": True})
    chunks = [c for c in iter_sse(reply.get_data().split(b"\n")) if c["choices"]]
    streamed = [entry["token"] for c in chunks if c["choices"][0]["logprobs"]
                for entry in c["choices"][0]["logprobs"]["content"]]
    assert streamed == ["He", "llo", "<|im_end|>"]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}


def test_completion_echo_with_logprobs_scores_a_prompt_as_lm_eval_reads_it(stack):
    """lm-evaluation-harness `local-completions` sends echo + logprobs=1 + max_tokens=1 and reads
    `token_logprobs[ctxlen:-1]`, comparing each with `max(top_logprobs[i].values())` for greediness."""
    client, http = stack({"http://w1": logprob_worker})
    body = client.post("/v1/completions", json={"model": "m", "prompt": "Say hi", "max_tokens": 1, "echo": True,
                                                "logprobs": 1, "temperature": 0}).get_json()
    choice = body["choices"][0]
    assert choice["text"] == "Say hiHello"
    logprobs = choice["logprobs"]
    assert logprobs["tokens"] == ["Say", " hi", "He", "llo", "<|im_end|>"]
    assert logprobs["token_logprobs"] == [None, -2.0, -0.5, -0.25, -0.1]
    assert logprobs["top_logprobs"][0] is None
    assert logprobs["top_logprobs"][1] == {" hi": -2.0, " yo": -2.5}
    assert logprobs["top_logprobs"][2] == {"He": -0.5, "Hi": -1.5}
    assert logprobs["text_offset"] == [0, 3, 6, 8, 11]
    assert http.payloads[0]["params"]["echo"] is True and http.payloads[0]["params"]["top_logprobs"] == 1
    # prompt scoring alone: max_tokens 0 with echo
    body = client.post("/v1/completions", json={"model": "m", "prompt": "Say hi", "max_tokens": 0, "echo": True,
                                                "logprobs": 0}).get_json()
    assert body["choices"][0]["text"] == "Say hi" and body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["logprobs"]["token_logprobs"] == [None, -2.0]
    assert body["choices"][0]["logprobs"]["top_logprobs"][1] == {" hi": -2.0, " yo": -2.5}
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 0, "total_tokens": 2}


def test_token_id_prompts_in_a_batch(stack):
    """`prompt` as token ids, several at once (how lm-eval sends them): one choice per prompt and n."""
    client, http = stack({"http://w1": logprob_worker})
    body = client.post("/v1/completions", json={"model": "m", "prompt": [[5, 6], [7, 8]], "max_tokens": 3,
                                                "n": 2, "seed": 10}).get_json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert sorted((p["prompt_ids"], p["params"]["seed"]) for p in http.payloads) == [
        ([5, 6], 10), ([5, 6], 11), ([7, 8], 12), ([7, 8], 13)]
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 12, "total_tokens": 16}
    # echo of a token prompt: its text comes from the tokens' texts (the worker is asked for them)
    body = client.post("/v1/completions", json={"model": "m", "prompt": [5, 6], "max_tokens": 3,
                                                "echo": True}).get_json()
    assert body["choices"][0]["text"] == "Say hiHello" and body["choices"][0]["logprobs"] is None
    assert http.payloads[-1]["params"]["logprobs"] is True


def test_streamed_completion_logprobs_and_echo(stack):
    client, _ = stack({"http://w1": logprob_worker})
    reply = client.post("/v1/completions", json={"model": "m", "prompt": "Say hi", "max_tokens": 3, "logprobs": 1,
                                                 "stream": True})
    chunks = [c["choices"][0] for c in iter_sse(reply.get_data().split(b"\n"))]
    assert "".join(c["text"] for c in chunks) == "Hello"
    tokens = [(t, o) for c in chunks for t, o in zip(c["logprobs"]["tokens"], c["logprobs"]["text_offset"])]
    assert tokens == [("He", 0), ("llo", 2), ("<|im_end|>", 5)]
    reply = client.post("/v1/completions", json={"model": "m", "prompt": "Say hi", "max_tokens": 3, "echo": True,
                                                 "stream": True})
    assert "".join(c["choices"][0]["text"] for c in iter_sse(reply.get_data().split(b"\n"))) == "Say hiHello"


# ---- busy, gone and restarted servers -----------------------------------------------------------------------
FULL = {"error": {"message": "queue full", "type": "rate_limit_error", "param": None, "code": "queue_full"}}


@pytest.mark.parametrize("stream", [False, True])
def test_full_queues_are_429_with_retry_after(stack, stream):
    client, _ = stack({"http://w1": lambda body: FakeResponse(429, FULL),
                       "http://w2": lambda body: FakeResponse(429, FULL)})
    reply = client.post("/v1/chat/completions", json={**CHAT, "stream": stream})
    assert_error(reply, 429, "queue_full")
    assert reply.headers["Retry-After"] == "1"


def test_a_model_seen_a_moment_ago_is_503_not_404(stack):
    client, _ = stack({"http://w1": ok_worker})
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
    client.controller.remove("http://w1")  # e.g. the controller restarted and the worker has not re-registered
    reply = client.post("/v1/chat/completions", json=CHAT)
    err = assert_error(reply, 503, "no_worker_available", "model")
    assert reply.headers["Retry-After"] == "1" and "retry" in err["message"]
    client.clock.now += 121  # long gone: the client learns the model is not there
    assert_error(client.post("/v1/chat/completions", json=CHAT), 404, "model_not_found", "model")


def test_controller_outage_routes_to_last_seen_workers(stack, caplog):
    client, http = stack({"http://w1": ok_worker, "http://w2": ConnectionError("refused")})
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
    http.controller_down = True
    with caplog.at_level(logging.WARNING, logger="ds_vicuna.serve"):
        texts = []
        for i in range(6):  # streaming and not, alternately
            reply = client.post("/v1/chat/completions", json={**CHAT, "stream": i % 2 == 1})
            assert reply.status_code == 200
            texts.append(streamed_text(reply) if i % 2 else reply.get_json()["choices"][0]["message"]["content"])
    assert texts == ["Hello!"] * 6
    outage_lines = [r for r in caplog.records if "unreachable" in r.getMessage() and "controller" in r.getMessage()]
    assert len(outage_lines) == 1  # one line for the outage, not one per request
    assert any("failover" in r.getMessage() and "http://w2" in r.getMessage() for r in caplog.records)
    health = client.get("/health")
    assert health.status_code == 200 and health.get_json()["status"] == "degraded"
    assert [m["id"] for m in client.get("/v1/models").get_json()["data"]] == ["m"]
    http.controller_down = False
    assert client.get("/health").get_json()["status"] == "ok"


def test_controller_down_and_no_worker_ever_seen_is_503(stack):
    client, http = stack({})
    http.controller_down = True
    reply = client.post("/v1/chat/completions", json=CHAT)
    assert_error(reply, 503, "no_worker_available")
    assert reply.headers["Retry-After"] == "1"
    assert client.get("/health").status_code == 503


def test_client_errors_name_no_internal_url_and_5xx_are_logged(stack, caplog):
    client, _ = stack({"http://w1.internal:21002": ConnectionError("refused"),
                       "http://w2.internal:21002": lambda body: FakeResponse(200, lines=[b"garbage"])})
    with caplog.at_level(logging.WARNING, logger="ds_vicuna.serve"):
        reply = client.post("/v1/chat/completions", json=CHAT)
    assert reply.status_code == 502
    assert "internal" not in reply.get_data(as_text=True) and "http" not in reply.get_json()["error"]["message"]
    messages = [r.getMessage() for r in caplog.records]
    assert sum("-> 502" in m for m in messages) == 1  # one line for the 5xx
    assert any("w1.internal" in m for m in messages)  # the log says which worker


def test_non_streaming_request_is_cancelled_when_its_client_goes_away(stack):
    import threading
    import time

    replies: list[EndlessResponse] = []

    def endless_worker(body):
        replies.append(EndlessResponse())
        return replies[-1]

    client, _ = stack({"http://w1": endless_worker})
    gone = threading.Event()
    threading.Timer(0.3, gone.set).start()
    started = time.monotonic()
    reply = client.post("/v1/chat/completions", json={**CHAT, "n": 2},
                        environ_overrides={"waitress.client_disconnected": gone.is_set})
    assert reply.status_code == 499 and time.monotonic() - started < 5
    assert len(replies) == 2 and all(r.closed for r in replies)


def test_metrics_in_prometheus_text_format(stack):
    from prometheus_client.parser import text_string_to_metric_families

    client, _ = stack({"http://w1": ok_worker}, api_keys=("k",))
    auth = {"Authorization": "Bearer k"}
    assert client.get("/metrics").status_code == 401
    client.post("/v1/chat/completions", json=CHAT, headers=auth)
    assert b"[DONE]" in client.post("/v1/chat/completions", json={**CHAT, "stream": True}, headers=auth).get_data()
    client.post("/v1/chat/completions", json={**CHAT, "model": "nope"}, headers=auth)
    reply = client.get("/metrics", headers=auth)
    assert reply.status_code == 200 and reply.mimetype == "text/plain"
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(reply.get_data(as_text=True)) for s in family.samples}
    assert samples[("ds_vicuna_requests_total", (("endpoint", "/v1/chat/completions"), ("status", "200")))] == 2
    assert samples[("ds_vicuna_requests_total", (("endpoint", "/v1/chat/completions"), ("status", "404")))] == 1
    assert samples[("ds_vicuna_errors_total", (("code", "model_not_found"),))] == 1
    assert samples[("ds_vicuna_generation_tokens_total", ())] == 6
    assert samples[("ds_vicuna_time_to_first_token_seconds_count", ())] == 2
    assert samples[("ds_vicuna_generation_tokens_per_second", ())] == pytest.approx(6 / 30)


def test_an_api_server_with_the_wrong_worker_secret_is_a_server_error_not_the_clients(stack, caplog):
    client, http = stack({"http://w1": ok_worker}, worker_secret="wrong")
    with caplog.at_level(logging.ERROR, logger="ds_vicuna.serve"):
        reply = client.post("/v1/chat/completions", json=CHAT)
    assert_error(reply, 500, "internal_error")
    assert http.calls == [] and any("--worker-secret" in r.getMessage() for r in caplog.records)
    assert client.get("/health").status_code == 503
