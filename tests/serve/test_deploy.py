"""A multi-process deployment on 127.0.0.1: controller, worker and API as separate processes, the way a cluster
runs them. Exposure without a secret is refused, a refused worker exits, and a controller outage or restart is
not a service outage. The worker serves a random 2-layer Llama over the SmolLM2 tokenizer (it loads in a second).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import requests

from ds_vicuna.train.launch_env import free_port
from tests.support.serve_fakes import save_tiny_checkpoint
from tests.support.serve_processes import start, stop

pytestmark = pytest.mark.slow
SECRET = "deploy-secret"
SECRET_HEADERS = {"X-Worker-Secret": SECRET}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, smol_tokenizer):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny_smol"), smol_tokenizer)


def run_serve(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "DS_VICUNA_WORKER_SECRET"}
    return subprocess.run([sys.executable, "-m", "ds_vicuna.serve", *args], capture_output=True, text=True,
                          timeout=timeout, env={**env, "TOKENIZERS_PARALLELISM": "false"})


def test_a_controller_or_worker_on_another_interface_needs_a_secret_or_insecure():
    for role in (["controller"], ["worker", "--model", "embedded"]):
        done = run_serve([*role, "--host", "0.0.0.0", "--port", "0"])
        assert done.returncode != 0, done.stdout
        assert "refusing to start" in done.stderr and "--insecure" in done.stderr and "ready" not in done.stdout
    proc, lines = start(["controller", "--host", "0.0.0.0", "--port", "0", "--insecure"], ready="controller ready")
    stop(proc)
    assert any("WARNING" in line and "NO worker secret" in line for line in lines)


def test_a_worker_whose_registration_is_refused_says_so_and_exits_non_zero(model_dir):
    port = free_port()
    controller, _ = start(["controller", "--port", str(port), "--worker-secret", SECRET], ready="controller ready")
    try:
        done = run_serve(["worker", "--model", str(model_dir), "--controller", f"http://127.0.0.1:{port}",
                          "--port", "0", "--worker-secret", "wrong"])
    finally:
        stop(controller)
    assert done.returncode == 1 and "ready" not in done.stdout
    assert "refused this worker" in done.stderr and "--worker-secret" in done.stderr


def test_a_controller_outage_and_restart_are_not_a_service_outage(model_dir):
    controller_port, api_port = free_port(), free_port()
    controller_url, base = f"http://127.0.0.1:{controller_port}", f"http://127.0.0.1:{api_port}"
    controller_args = ["controller", "--port", str(controller_port), "--worker-secret", SECRET,
                       "--heartbeat-expiry", "3"]
    procs = [start(controller_args, ready="controller ready")[0]]
    try:
        procs.append(start(["worker", "--model", str(model_dir), "--model-name", "tiny", "--controller",
                            controller_url, "--port", "0", "--worker-secret", SECRET, "--heartbeat-interval", "0.5",
                            "--torch-threads", "1"], ready="worker ready")[0])
        procs.append(start(["api", "--controller", controller_url, "--port", str(api_port), "--worker-secret",
                            SECRET], ready="API ready")[0])

        def chat() -> int:
            return requests.post(f"{base}/v1/chat/completions", timeout=60, json={
                "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}).status_code

        assert chat() == 200
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait(10)
        assert [chat() for _ in range(5)] == [200] * 5  # routed to the worker the controller last named
        health = requests.get(f"{base}/health", timeout=10)
        assert health.status_code == 200 and health.json()["status"] == "degraded"
        procs[0] = start(controller_args, ready="controller ready")[0]  # restarted: an empty table
        statuses, deadline = [], time.monotonic() + 20
        while time.monotonic() < deadline:
            statuses.append(chat())
            workers = requests.get(f"{controller_url}/status", headers=SECRET_HEADERS, timeout=10).json()["workers"]
            if workers and statuses[-1] == 200:
                break
            time.sleep(0.1)
        assert workers, "the worker never registered with the restarted controller"
        assert set(statuses) <= {200, 503} and statuses[-1] == 200, statuses  # never a 404 for a served model
        assert requests.get(f"{base}/health", timeout=10).json()["status"] == "ok"
    finally:
        for proc in procs:
            stop(proc)
