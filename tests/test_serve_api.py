"""API server in-process: OpenAI error shapes, auth, limits, moderation and failover, with fake workers.

The controller is the real one (Flask test client); workers are scripted so no model is loaded.
"""
from __future__ import annotations

import json

import pytest

from ds_vicuna.serve.api import APIConfig, create_app, iter_sse
from ds_vicuna.serve.controller import Controller
from ds_vicuna.serve.controller import create_app as controller_app
from ds_vicuna.serve.moderation import Moderator
from ds_vicuna.serve.protocol import DoneEvent, TextEvent, to_line

CONTROLLER = "http://controller"


class FakeResponse:
    def __init__(self, status: int, body=None, lines=(), broken_after: int | None = None):
        self.status_code, self._body, self._lines, self._broken_after = status, body, list(lines), broken_after

    def json(self):
        return self._body

    def iter_lines(self):
        for i, line in enumerate(self._lines):
            if self._broken_after is not None and i >= self._broken_after:
                raise ConnectionError("connection reset")
            yield line.rstrip(b"\n")
        if self._broken_after is not None:
            raise ConnectionError("connection reset")

    def close(self):
        pass

    def raise_for_status(self):
        assert self.status_code == 200


def events(*texts, finish="stop", prompt_tokens=3):
    """A worker's reply lines, written by the worker's own encoder (`serve.protocol`)."""
    return [to_line(TextEvent(t)) for t in texts] + [to_line(DoneEvent(finish, prompt_tokens, len(texts)))]


class FakeHTTP:
    """`requests`-like: the controller is a Flask test client, each worker a function(body) -> FakeResponse."""

    def __init__(self, controller_client, workers: dict):
        self.controller, self.workers, self.calls = controller_client, workers, []

    def get(self, url, timeout=None, **kwargs):
        reply = self.controller.get(url[len(CONTROLLER):])
        return FakeResponse(reply.status_code, reply.get_json())

    def post(self, url, json=None, timeout=None, stream=False, headers=None):
        if url.startswith(CONTROLLER):
            reply = self.controller.post(url[len(CONTROLLER):], json=json)
            return FakeResponse(reply.status_code, reply.get_json())
        address = url.rsplit("/", 1)[0]
        self.calls.append(address)
        behaviour = self.workers[address]
        if isinstance(behaviour, Exception):
            raise behaviour
        return behaviour(json)


@pytest.fixture
def stack():
    controller = Controller(heartbeat_expiry=60)
    http = FakeHTTP(controller_app(controller).test_client(), {})

    def build(workers: dict, **config):
        for address in workers:
            controller.register(address, ["m"])
        http.workers.update(workers)
        app = create_app(APIConfig(CONTROLLER, **config), http=http)
        return app.test_client(), http

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


def test_worker_failing_before_first_token_is_retried_elsewhere(stack):
    client, http = stack({"http://w1": ConnectionError("refused"),
                          "http://w2": lambda body: FakeResponse(200, lines=events("x"), broken_after=0),
                          "http://w3": ok_worker})
    reply = client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert reply.status_code == 200
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in iter_sse(reply.get_data().split(b"\n"))
                   if c["choices"])
    assert text == "Hello!"
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
    assert len(replies) == n and b'"content": "x"' in b"".join(received).replace(b'":"', b'": "')
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
    from ds_vicuna.serve.api import JobStream

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
