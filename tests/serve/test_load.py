"""Load on a real `serve all` (one process: controller + worker + API on 127.0.0.1) with a tiny random model.

What once wedged the stack: a request of 512 jobs opened a connection per job (about 1,000 sockets), killed the
server loops (`select()` past descriptor 1023) and starved the controller. Now: 128 clients at once each get a 200
or a 429 with Retry-After, nobody a reset or a hang, while /health (API and controller) keeps answering; the
512-job request is answered in seconds and leaves no sockets behind. Every wait here is bounded.
"""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from ds_vicuna.train.launch_env import free_port
from tests.support.serve_fakes import save_tiny_checkpoint
from tests.support.serve_processes import start, stop

pytestmark = pytest.mark.slow

CLIENTS = 128
HEALTH_DEADLINE_S = 2.0  # the API's /health
CONTROLLER_DEADLINE_S = 1.0  # the controller's: registry reads and heartbeats are never starved


@pytest.fixture(scope="module")
def stack(tmp_path_factory, smol_tokenizer):
    folder = save_tiny_checkpoint(tmp_path_factory.mktemp("load") / "tiny", smol_tokenizer)
    port, controller_port = free_port(), free_port()
    proc, lines = start(["all", "--model", str(folder), "--port", str(port), "--controller-port",
                         str(controller_port), "--torch-threads", "1", "--heartbeat-interval", "0.5",
                         "--max-queue", "512", "--max-jobs-per-request", "512"], ready="ds-vicuna API ready at")
    base = f"http://127.0.0.1:{port}"
    # ready means served: the model is listed and answers from the first moment
    models = requests.get(f"{base}/v1/models", timeout=10).json()["data"]
    yield {"base": base, "controller": f"http://127.0.0.1:{controller_port}", "pid": proc.pid, "lines": lines,
           "model": "tiny", "models_at_ready": [m["id"] for m in models]}
    stop(proc)


class HealthWatch:
    """Polls the API's and the controller's /health (a fresh connection each time) while a load runs; records
    the slowest answer of each and any failure."""

    def __init__(self, stack: dict):
        self.urls = {"api": f"{stack['base']}/health", "controller": f"{stack['controller']}/health"}
        self.slowest = {name: 0.0 for name in self.urls}
        self.failures: list[str] = []
        self.polls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            for name, url in self.urls.items():
                started = time.monotonic()
                try:
                    status = requests.get(url, timeout=HEALTH_DEADLINE_S * 5).status_code
                except requests.RequestException as err:
                    status = type(err).__name__
                took = time.monotonic() - started
                self.slowest[name] = max(self.slowest[name], took)
                if status != 200:
                    self.failures.append(f"{name}: {status} after {took:.2f} s")
            self.polls += 1
            self._stop.wait(0.2)

    def __enter__(self) -> "HealthWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(30)


def chat(stack: dict, content: str = "Hello there", timeout: float = 180) -> requests.Response:
    return requests.post(f"{stack['base']}/v1/chat/completions", timeout=timeout, json={
        "model": stack["model"], "messages": [{"role": "user", "content": content}], "max_tokens": 8})


def sockets(pid: int) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except OSError:  # closed meanwhile
            pass
    return count


def settle(pid: int, at_most: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while sockets(pid) > at_most and time.monotonic() < deadline:
        time.sleep(0.2)
    return sockets(pid)


def test_ready_means_the_model_is_served(stack):
    assert stack["models_at_ready"] == [stack["model"]]
    assert chat(stack, timeout=30).status_code == 200


def test_128_clients_at_once_get_200_or_429_and_health_keeps_answering(stack):
    barrier = threading.Barrier(CLIENTS, timeout=60)

    def client(i: int):
        barrier.wait()
        started = time.monotonic()
        try:
            reply = chat(stack, f"Tell me about number {i}.")
        except requests.RequestException as err:  # a reset or a hang (past 180 s) fails the test below
            return type(err).__name__, None, time.monotonic() - started
        return reply.status_code, reply.headers.get("Retry-After"), time.monotonic() - started

    with HealthWatch(stack) as watch, ThreadPoolExecutor(CLIENTS) as pool:
        outcomes = list(pool.map(client, range(CLIENTS)))
    statuses = [status for status, _, _ in outcomes]
    assert set(statuses) <= {200, 429}, sorted(map(str, statuses))
    assert statuses.count(200) >= 8, statuses  # the worker's batch at least
    assert all(retry == "1" for status, retry, _ in outcomes if status == 429)
    assert max(took for _, _, took in outcomes) < 180
    assert watch.polls >= 1 and watch.failures == []
    assert watch.slowest["api"] < HEALTH_DEADLINE_S, watch.slowest
    assert watch.slowest["controller"] < CONTROLLER_DEADLINE_S, watch.slowest
    assert chat(stack, timeout=30).status_code == 200  # serving normally right after


def test_a_512_job_request_is_answered_and_leaves_no_sockets_behind(stack):
    assert chat(stack, timeout=30).status_code == 200
    before = settle(stack["pid"], 0, timeout=2)
    body = {"model": stack["model"], "prompt": ["Hi"] * 64, "n": 8, "max_tokens": 1}
    with HealthWatch(stack) as watch:
        started = time.monotonic()
        reply = requests.post(f"{stack['base']}/v1/completions", json=body, timeout=60)
        took = time.monotonic() - started
    assert reply.status_code == 200 and took < 30, (reply.status_code, took)
    assert len(reply.json()["choices"]) == 512
    assert watch.failures == [] and watch.slowest["api"] < HEALTH_DEADLINE_S, watch.slowest
    assert watch.slowest["controller"] < CONTROLLER_DEADLINE_S, watch.slowest
    assert chat(stack, timeout=30).status_code == 200
    after = settle(stack["pid"], before + 4)
    assert after <= before + 4, (before, after)  # one pooled connection per peer, not one per job
