"""Routing jobs to workers (`serve.routing`): failover before the first token, retries of whole non-streaming
jobs, full queues, controller outages and restarts, and errors that name no internal URL."""
from __future__ import annotations

import logging

import pytest

from ds_vicuna.serve.routing import BatchStream
from ds_vicuna.serve.worker_events import TextEvent
from tests.support.serve_fakes import (CHAT, FULL, EndlessResponse, FakeResponse, assert_error, events, ok_worker,
                                        streamed_text)


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


def test_closing_a_batch_stream_before_reading_it_closes_the_worker_connection():
    response = EndlessResponse()

    def events():
        try:
            yield from ((0, TextEvent("x")) for _ in response.iter_lines())
        finally:
            response.close()

    inner = events()
    next(inner)  # the first event, as Upstream.open_batch reads it before choosing a worker
    stream = BatchStream((0, TextEvent("x")), inner)
    stream.close()
    assert response.closed


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


def test_an_api_server_with_the_wrong_worker_secret_is_a_server_error_not_the_clients(stack, caplog):
    client, http = stack({"http://w1": ok_worker}, worker_secret="wrong")
    with caplog.at_level(logging.ERROR, logger="ds_vicuna.serve"):
        reply = client.post("/v1/chat/completions", json=CHAT)
    assert_error(reply, 500, "internal_error")
    assert http.calls == [] and any("--worker-secret" in r.getMessage() for r in caplog.records)
    assert client.get("/health").status_code == 503


def test_a_batch_broken_mid_way_retries_only_its_unfinished_jobs_elsewhere(stack):
    def half_broken(body):
        if body["prompt"] == "a":
            return FakeResponse(200, lines=events("A"))
        return FakeResponse(200, lines=events("x", "y"), broken_after=1)

    client, http = stack({"http://w1": half_broken, "http://w2": ok_worker})
    reply = client.post("/v1/completions", json={"model": "m", "prompt": ["a", "b"], "max_tokens": 3})
    texts = [c["text"] for c in reply.get_json()["choices"]]
    assert reply.status_code == 200 and texts == ["A", "Hello!"]
    assert http.calls == ["http://w1", "http://w2"]
    assert [p["prompt"] for p in http.payloads] == ["a", "b", "b"]  # the finished job was not run again
