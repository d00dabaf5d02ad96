"""The worker's HTTP side and its controller client: the secret on every endpoint, /metrics, /health, and
registration (again after a controller restart; refused -> the worker ends; unhealthy -> it leaves).

The model is a random 2-layer Llama over the SmolLM2 tokenizer: these tests need a working engine, not a good one.
"""
from __future__ import annotations

import time

import pytest

from ds_vicuna.serve.worker_events import DoneEvent, TextEvent, parse_job_line, parse_line
from ds_vicuna.model.loading import ChatModel
from ds_vicuna.serve.worker import RegistrationRefused, Worker, create_app

SECRET = "s3cret"
CONTROLLER = "http://controller"


@pytest.fixture(scope="module")
def loaded(smol_tokenizer):
    from tests.support.serve_helpers import random_llama

    return ChatModel.build(random_llama(smol_tokenizer, max_positions=512), smol_tokenizer, "tokenizer", name="tiny")


class Reply:
    def __init__(self, status: int, body: dict):
        self.status_code, self._body = status, body

    def json(self):
        return self._body

    def raise_for_status(self):
        if self.status_code >= 400:
            raise RuntimeError(f"HTTP {self.status_code}")


class FakeController:
    """`requests`-like: answers /register_worker and /heartbeat as a controller that may forget or refuse us."""

    def __init__(self, knows_worker: bool = True, refuse: bool = False):
        self.knows_worker, self.refuse, self.posts = knows_worker, refuse, []

    def post(self, url, json=None, headers=None, timeout=None):
        path = url[len(CONTROLLER):]
        self.posts.append((path, json, headers))
        if self.refuse:
            return Reply(403, {"error": {"code": "invalid_worker_secret", "message": "wrong worker secret"}})
        if path == "/register_worker":
            self.knows_worker = True
            return Reply(200, {"registered": True})
        return Reply(200, {"exist": self.knows_worker})

    def paths(self) -> list[str]:
        return [p for p, _, _ in self.posts]


def make_worker(loaded, http=None, **kwargs) -> Worker:
    return Worker(loaded, "http://worker", CONTROLLER if http else None, http, max_batch_size=2, max_queue=4,
                  secret=SECRET, heartbeat_interval=0.05, **kwargs)


@pytest.fixture
def served(loaded):
    worker = make_worker(loaded)
    worker.start()
    yield worker, create_app(worker).test_client()
    worker.stop()


GENERATE = {"prompt": "Hello", "params": {"max_tokens": 3, "temperature": 0.0}}


def test_every_endpoint_but_health_needs_the_secret(served):
    _, client = served
    calls = [("post", "/worker_generate_stream", GENERATE), ("post", "/count_tokens", {"prompt": "Hello"}),
             ("get", "/worker_status", None), ("get", "/metrics", None)]
    for method, path, body in calls:
        for headers in ({}, {"X-Worker-Secret": "wrong"}):
            reply = getattr(client, method)(path, json=body, headers=headers)
            assert reply.status_code == 403, (path, headers)
            assert reply.get_json()["error"]["code"] == "invalid_worker_secret"
    assert client.get("/health").get_json() == {"status": "ok"}
    reply = client.post("/worker_generate_stream", json=GENERATE, headers={"X-Worker-Secret": SECRET})
    events = [parse_line(line) for line in reply.get_data().splitlines()]
    assert reply.status_code == 200 and isinstance(events[-1], DoneEvent) and events[-1].completion_tokens == 3


def test_token_id_prompts(served, loaded):
    worker, client = served
    headers = {"X-Worker-Secret": SECRET}
    ids = loaded.tokenizer("Hello there")["input_ids"]
    assert worker.prompt_ids({"prompt_ids": ids}) == ids
    reply = client.post("/worker_generate_stream", json={"prompt_ids": ids, "params": {"max_tokens": 2}},
                        headers=headers)
    assert parse_line(reply.get_data().splitlines()[-1]) == DoneEvent("length", len(ids), 2)
    for bad in ([], [len(loaded.tokenizer)], [True], "12"):
        reply = client.post("/worker_generate_stream", json={"prompt_ids": bad, "params": {}}, headers=headers)
        assert reply.status_code == 400 and reply.get_json()["error"]["param"] == "prompt", bad


def test_metrics_count_jobs_and_show_the_queue(served):
    from prometheus_client.parser import text_string_to_metric_families

    worker, client = served
    client.post("/worker_generate_stream", json=GENERATE, headers={"X-Worker-Secret": SECRET}).get_data()
    assert wait_for(lambda: worker.queue_length() == 0)  # the scheduler counts a finished job out after its step
    reply = client.get("/metrics", headers={"Authorization": f"Bearer {SECRET}"})  # as Prometheus sends it
    samples = {s.name: s.value for family in text_string_to_metric_families(reply.get_data(as_text=True))
               for s in family.samples if not s.labels}
    assert samples["ds_vicuna_queue_length"] == 0 and samples["ds_vicuna_queue_limit"] == 4
    assert samples["ds_vicuna_generation_tokens_total"] == 3
    assert samples["ds_vicuna_time_to_first_token_seconds_count"] == 1


def metric_samples(client) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    text = client.get("/metrics", headers={"X-Worker-Secret": SECRET}).get_data(as_text=True)
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
            if not s.labels}


def test_a_batch_call_runs_every_job_and_tags_each_line(served):
    worker, client = served
    jobs = [GENERATE, {"prompt": "Hi there", "params": {"max_tokens": 2, "temperature": 0.0}}]
    reply = client.post("/worker_generate_batch", json={"jobs": jobs}, headers={"X-Worker-Secret": SECRET})
    assert reply.status_code == 200
    events = [parse_job_line(line) for line in reply.get_data().splitlines()]
    done = {job: event for job, event in events if isinstance(event, DoneEvent)}
    assert sorted(done) == [0, 1] and (done[0].completion_tokens, done[1].completion_tokens) == (3, 2)
    assert sum(e.tokens for _, e in events if isinstance(e, TextEvent)) <= 5  # text events say their tokens
    bad = client.post("/worker_generate_batch", json={"jobs": [GENERATE, {"prompt": ""}]},
                      headers={"X-Worker-Secret": SECRET})
    assert bad.status_code == 400 and bad.get_json()["error"]["message"].startswith("jobs[1]: ")
    for body in ({"jobs": []}, {"jobs": "x"}, {"jobs": [GENERATE] * 5}):  # 5 > max_queue: never admissible
        reply = client.post("/worker_generate_batch", json=body, headers={"X-Worker-Secret": SECRET})
        assert reply.status_code == 400 and reply.get_json()["error"]["param"] == "jobs", body


def test_a_batch_is_admitted_all_or_none(loaded):
    worker = make_worker(loaded)  # not started: what is queued stays queued
    client = create_app(worker).test_client()
    for _ in range(3):
        worker.submit(worker.make_job(GENERATE))
    reply = client.post("/worker_generate_batch", json={"jobs": [GENERATE, GENERATE]},
                        headers={"X-Worker-Secret": SECRET})
    assert reply.status_code == 429 and reply.headers["Retry-After"] == "1"
    assert worker.queue_length() == 3  # neither job was queued
    samples = metric_samples(client)
    assert samples["ds_vicuna_queue_depth"] == 3 and samples["ds_vicuna_running_jobs"] == 0


def test_tokens_of_a_job_whose_caller_went_away_are_counted(served):
    worker, client = served
    long_job = {"prompt": "Hello", "params": {"max_tokens": 200, "temperature": 0.0}}
    reply = client.post("/worker_generate_batch", json={"jobs": [long_job]}, headers={"X-Worker-Secret": SECRET},
                        buffered=False)
    lines = iter(reply.response)
    next(lines)
    next(lines)
    reply.close()  # the API went away: the job is cancelled; what it generated still counts
    assert wait_for(lambda: worker.queue_length() == 0)
    samples = metric_samples(client)
    assert 2 <= samples["ds_vicuna_generation_tokens_total"] < 200
    assert samples["ds_vicuna_request_duration_seconds_count"] == 1
    assert samples["ds_vicuna_inter_token_latency_seconds_count"] >= 1


def wait_for(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_registers_again_when_the_controller_forgot_it(loaded):
    http = FakeController(knows_worker=False)
    worker = make_worker(loaded, http)
    worker.heartbeat()
    assert http.paths() == ["/heartbeat", "/register_worker"]
    worker.heartbeat()  # known now: no second registration
    assert http.paths() == ["/heartbeat", "/register_worker", "/heartbeat"]
    assert all(headers == {"X-Worker-Secret": SECRET} for _, _, headers in http.posts)
    assert http.posts[0][1] == {"worker_address": "http://worker", "queue_length": 0, "healthy": True}


def test_a_controller_restart_is_noticed_by_the_heartbeat_loop(loaded):
    http = FakeController()
    worker = make_worker(loaded, http)
    worker.start()
    try:
        assert http.paths() == ["/register_worker"]
        http.knows_worker = False  # the controller restarted with an empty table
        assert wait_for(lambda: http.paths().count("/register_worker") == 2)
    finally:
        worker.stop()


def test_a_refused_registration_ends_the_worker(loaded):
    worker = make_worker(loaded, FakeController(refuse=True))
    with pytest.raises(RegistrationRefused, match="worker-secret"):
        worker.start()
    assert worker._threads == []  # nothing was started
    http = FakeController()
    worker = make_worker(loaded, http)
    worker.start()
    try:
        http.refuse = True  # e.g. the controller came back with another secret
        assert worker.stopped.wait(5) and "refused" in worker.refused
    finally:
        worker.stop()


def test_the_worker_is_healthy_while_it_starts(loaded, monkeypatch):
    """Between creating its scheduler thread and starting it the worker is not dead: a request or heartbeat in
    that moment must not see it unhealthy."""
    import threading

    seen = []
    start = threading.Thread.start

    def watched_start(thread):
        seen.append((thread.name, worker.healthy))
        start(thread)

    worker = make_worker(loaded, FakeController())
    monkeypatch.setattr(threading.Thread, "start", watched_start)
    worker.start()
    monkeypatch.undo()
    try:
        assert ("scheduler", True) in seen and all(healthy for _, healthy in seen) and worker.healthy
    finally:
        worker.stop()


def test_a_dead_scheduler_takes_the_worker_out_of_rotation(loaded):
    http = FakeController()
    worker = make_worker(loaded, http)
    worker._schedule_loop = lambda: None  # the scheduler thread ends at once, as if it had crashed
    worker.start()
    try:
        assert wait_for(lambda: not worker.healthy)
        assert wait_for(lambda: any(body.get("healthy") is False for _, body, _ in http.posts))
        client = create_app(worker).test_client()
        assert client.get("/health").status_code == 503
        reply = client.post("/worker_generate_stream", json=GENERATE, headers={"X-Worker-Secret": SECRET})
        assert reply.status_code == 502 and reply.get_json()["error"]["code"] == "worker_failed"
        time.sleep(0.2)
        assert http.paths().count("/register_worker") == 1  # it does not come back while unhealthy
    finally:
        worker.stop()
