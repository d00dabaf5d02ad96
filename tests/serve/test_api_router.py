"""The API's HTTP side (`serve.api_router`): API keys, body limits and unknown routes in OpenAI's error shape,
/health, and /metrics in Prometheus text format."""
from __future__ import annotations

import pytest

from tests.support.serve_fakes import CHAT, assert_error, ok_worker


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
