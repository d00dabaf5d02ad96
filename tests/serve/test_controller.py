"""Controller: registration secret, least-loaded routing and heartbeat expiry, with an injected clock."""
from __future__ import annotations

import pytest

from ds_vicuna.serve.controller import Controller, create_app
from ds_vicuna.serve.errors import APIError, ErrorCode


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return FakeClock()


def test_least_loaded_worker_is_picked_and_picks_count_until_heartbeat(clock):
    c = Controller(heartbeat_expiry=5, clock=clock)
    c.register("http://a", ["m"], queue_length=3)
    c.register("http://b", ["m"], queue_length=1)
    assert c.pick_worker("m") == "http://b"  # b: 1 -> 2
    assert c.pick_worker("m") == "http://b"  # b: 2 -> 3
    assert c.pick_worker("m") == "http://a"  # tie 3/3 broken by address
    assert c.heartbeat("http://b", 0)
    assert c.pick_worker("m") == "http://b"
    assert c.pick_worker("m", exclude=["http://b"]) == "http://a"


def test_unknown_model_and_all_excluded_are_distinct_errors(clock):
    c = Controller(heartbeat_expiry=5, clock=clock, registration_grace=0)
    c.register("http://a", ["m"])
    with pytest.raises(APIError) as err:
        c.pick_worker("other")
    assert err.value.code is ErrorCode.MODEL_NOT_FOUND and err.value.code.status == 404 and "m" in err.value.message
    with pytest.raises(APIError) as err:
        c.pick_worker("m", exclude=["http://a"])
    assert err.value.code is ErrorCode.NO_WORKER and err.value.code.status == 503


def test_worker_without_heartbeat_is_dropped_after_expiry(clock):
    c = Controller(heartbeat_expiry=5, clock=clock)
    c.register("http://a", ["m"])
    c.register("http://b", ["m", "n"])
    clock.now += 4
    assert c.heartbeat("http://b", 0)
    clock.now += 1.5  # a: 5.5 s silent, b: 1.5 s
    assert [w["address"] for w in c.status()] == ["http://b"]
    assert c.pick_worker("m") == "http://b"
    assert not c.heartbeat("http://a", 0)  # told to register again
    clock.now += 5.01
    assert c.models() == []


def test_a_restarted_controller_answers_503_until_workers_had_time_to_register_again(clock):
    """Within one heartbeat expiry every live worker heartbeats, hears `exist: false` and registers again."""
    c = Controller(heartbeat_expiry=5, clock=clock)
    with pytest.raises(APIError) as err:
        c.pick_worker("m")
    assert err.value.code is ErrorCode.NO_WORKER and err.value.code.status == 503 and "retry" in err.value.message
    assert not c.heartbeat("http://a", 0)  # the worker learns it must register again
    c.register("http://a", ["m"])
    assert c.pick("m") == ("http://a", ["http://a"])
    clock.now += 6
    c.heartbeat("http://a", 0)
    with pytest.raises(APIError) as err:
        c.pick_worker("typo")
    assert err.value.code is ErrorCode.MODEL_NOT_FOUND


def test_a_worker_reporting_itself_unhealthy_leaves_at_once(clock):
    c = Controller(heartbeat_expiry=5, clock=clock)
    c.register("http://a", ["m"])
    c.register("http://b", ["m"])
    assert not c.heartbeat("http://a", 0, healthy=False)
    assert [w["address"] for w in c.status()] == ["http://b"]
    assert c.pick("m") == ("http://b", ["http://b"])


def test_http_every_endpoint_but_health_needs_the_secret(clock):
    app = create_app(Controller(heartbeat_expiry=5, secret="s3cret", clock=clock, registration_grace=0))
    client = app.test_client()
    body = {"worker_address": "http://127.0.0.1:9", "models": ["m"], "queue_length": 0}
    calls = [("post", "/register_worker", body), ("post", "/heartbeat", body), ("post", "/unregister_worker", body),
             ("post", "/get_worker_address", {"model": "m"}), ("get", "/list_models", None),
             ("get", "/status", None), ("get", "/", None)]
    for method, path, payload in calls:
        for headers in ({}, {"X-Worker-Secret": "wrong"}, {"Authorization": "Bearer wrong"}):
            reply = getattr(client, method)(path, json=payload, headers=headers)
            assert reply.status_code == 403, (path, headers)
            assert reply.get_json()["error"]["code"] == "invalid_worker_secret"
    assert client.get("/health").status_code == 200
    assert client.get("/list_models", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_http_registration_routes_and_health_reports(clock):
    app = create_app(Controller(heartbeat_expiry=5, secret="s3cret", clock=clock, registration_grace=0))
    client = app.test_client()
    ok = {"X-Worker-Secret": "s3cret"}
    body = {"worker_address": "http://127.0.0.1:9", "models": ["m"], "queue_length": 0}
    assert client.get("/list_models", headers=ok).get_json() == {"models": []}
    assert client.post("/register_worker", json=body, headers=ok).status_code == 200
    assert client.get("/list_models", headers=ok).get_json() == {"models": ["m"]}
    assert client.post("/get_worker_address", json={"model": "m"}, headers=ok).get_json() == {
        "address": "http://127.0.0.1:9", "workers": ["http://127.0.0.1:9"]}
    missing = client.post("/get_worker_address", json={"model": "x"}, headers=ok)
    assert missing.status_code == 404 and missing.get_json()["error"]["param"] == "model"
    bad = client.post("/register_worker", json={**body, "worker_address": "file:///etc"}, headers=ok)
    assert bad.status_code == 400 and bad.get_json()["error"]["param"] == "worker_address"
    status = client.get("/status", headers=ok).get_json()
    assert status["workers"][0]["address"] == "http://127.0.0.1:9"
    assert "127.0.0.1:9" in client.get("/", headers=ok).get_data(as_text=True)
    bad = client.post("/heartbeat", json={**body, "healthy": "no"}, headers=ok)
    assert bad.status_code == 400 and bad.get_json()["error"]["param"] == "healthy"
    assert client.post("/heartbeat", json={**body, "healthy": False}, headers=ok).get_json() == {"exist": False}
    assert client.get("/list_models", headers=ok).get_json() == {"models": []}
