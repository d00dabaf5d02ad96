"""Controller: registration secret, least-loaded routing and heartbeat expiry, with an injected clock."""
from __future__ import annotations

import pytest

from ds_vicuna.serve.controller import Controller, create_app
from ds_vicuna.serve.schemas import APIError, ErrorCode


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
    c = Controller(heartbeat_expiry=5, clock=clock)
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


def test_http_registration_needs_the_secret_and_routes(clock):
    app = create_app(Controller(heartbeat_expiry=5, secret="s3cret", clock=clock))
    client = app.test_client()
    body = {"worker_address": "http://127.0.0.1:9", "models": ["m"], "queue_length": 0}
    for headers in ({}, {"X-Worker-Secret": "wrong"}):
        reply = client.post("/register_worker", json=body, headers=headers)
        assert reply.status_code == 403
        assert reply.get_json()["error"]["code"] == "invalid_worker_secret"
    assert client.get("/list_models").get_json() == {"models": []}
    assert client.post("/register_worker", json=body, headers={"X-Worker-Secret": "s3cret"}).status_code == 200
    assert client.get("/list_models").get_json() == {"models": ["m"]}
    assert client.post("/get_worker_address", json={"model": "m"}).get_json() == {"address": "http://127.0.0.1:9"}
    missing = client.post("/get_worker_address", json={"model": "x"})
    assert missing.status_code == 404 and missing.get_json()["error"]["param"] == "model"
    bad = client.post("/register_worker", json={**body, "worker_address": "file:///etc"},
                      headers={"X-Worker-Secret": "s3cret"})
    assert bad.status_code == 400 and bad.get_json()["error"]["param"] == "worker_address"
    status = client.get("/status").get_json()
    assert status["workers"][0]["address"] == "http://127.0.0.1:9"
    assert "127.0.0.1:9" in client.get("/").get_data(as_text=True)
