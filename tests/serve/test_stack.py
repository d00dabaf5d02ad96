"""The real stack in real processes on 127.0.0.1 with the embedded model.

`python -m ds_vicuna.serve all` (= `ds-vicuna serve all`) runs controller + worker + API; a second
`serve worker` process joins the same controller (both load at once). Tests run in file order; the failover test
kills the second worker by PID, so it is last.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from ds_vicuna.train.launch_env import free_port
from tests.support.serve_processes import start, stop

pytestmark = pytest.mark.slow

KEY, SECRET, EXPIRY = "test-key", "test-secret", 3.0
MODEL = "smollm2-135m-instruct"
BODY_LIMIT = 100_000


@pytest.fixture(scope="module")
def stack():
    port, controller_port = free_port(), free_port()
    controller = f"http://127.0.0.1:{controller_port}"
    second = subprocess.Popen([sys.executable, "-u", "-m", "ds_vicuna.serve", "worker", "--model", "embedded",
                               "--controller", controller, "--port", "0", "--worker-secret", SECRET,
                               "--heartbeat-interval", "0.5", "--torch-threads", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc, lines = start(["all", "--model", "embedded", "--port", str(port), "--controller-port",
                             str(controller_port), "--api-key", KEY, "--worker-secret", SECRET, "--heartbeat-expiry",
                             str(EXPIRY), "--heartbeat-interval", "0.5", "--max-content-length", str(BODY_LIMIT),
                             "--torch-threads", "1"],
                            ready="ds-vicuna API ready at")
    except Exception:
        second.kill()
        raise
    yield {"base": f"http://127.0.0.1:{port}", "controller": controller, "lines": lines, "second": second}
    stop(proc)
    if second.poll() is None:
        second.kill()
    second.wait(10)


def headers(key: str | None = KEY) -> dict:
    return {"Authorization": f"Bearer {key}"} if key else {}


def chat_body(content: str = "What is the capital of France?", **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 8,
            "temperature": 0, **extra}


def test_health_and_readiness_line(stack):
    assert any(f"{stack['base']}/v1" in line for line in stack["lines"])
    assert any("workers on other hosts can join" in line for line in stack["lines"])
    reply = requests.get(f"{stack['base']}/health", timeout=10)
    assert reply.status_code == 200 and reply.json()["models"] == [MODEL]


def test_official_openai_client(stack):
    import openai
    from openai import OpenAI

    client = OpenAI(base_url=f"{stack['base']}/v1", api_key=KEY, max_retries=0, timeout=120)
    assert [m.id for m in client.models.list()] == [MODEL]
    reply = client.chat.completions.create(model=MODEL, max_tokens=8, temperature=0,
                                           messages=[{"role": "user", "content": "What is the capital of France?"}])
    text = reply.choices[0].message.content
    assert "Paris" in text and reply.usage.completion_tokens > 0 and reply.usage.prompt_tokens > 5
    pieces = [chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
        model=MODEL, max_tokens=8, temperature=0, stream=True,
        messages=[{"role": "user", "content": "What is the capital of France?"}]) if chunk.choices]
    assert "".join(pieces) == text and len([p for p in pieces if p]) > 1  # same greedy text, streamed in pieces
    completion = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4,
                                           temperature=0)
    choice, used = completion.choices[0], completion.usage.completion_tokens
    assert choice.text.strip()
    assert (choice.finish_reason, used) == ("length", 4) or (choice.finish_reason == "stop" and 0 < used <= 4)
    # what LangChain sends: a developer message and content as a list of text parts
    reply = client.chat.completions.create(model=MODEL, max_tokens=8, temperature=0, messages=[
        {"role": "developer", "content": "Answer in one word."},
        {"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}])
    assert "Paris" in reply.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "hi"}],
                                       response_format={"type": "json_object"})
    assert err.value.body["param"] == "response_format" and err.value.body["code"] == "unsupported_parameter"


def test_bad_inputs_are_openai_errors_and_server_keeps_serving(stack):
    url = f"{stack['base']}/v1/chat/completions"
    json_headers = {**headers(), "Content-Type": "application/json"}
    cases = [
        (dict(data=b"{oops", headers=json_headers), 400, "invalid_json"),
        (dict(json=chat_body(max_tokens="ten"), headers=headers()), 400, "invalid_type"),
        (dict(json={**chat_body(), "model": "no-such-model"}, headers=headers()), 404, "model_not_found"),
        (dict(json={**chat_body(), "messages": []}, headers=headers()), 400, "invalid_messages"),
        (dict(json=chat_body("hello " * 9000), headers=headers()), 400, "context_length_exceeded"),
        (dict(json=chat_body("x" * (BODY_LIMIT + 10)), headers=headers()), 413, "request_too_large"),
        (dict(json=chat_body(), headers={}), 401, "invalid_api_key"),
        (dict(json=chat_body(), headers=headers("wrong")), 401, "invalid_api_key"),
        # each of these once killed a worker's scheduler or failed between the API and the worker
        (dict(json=chat_body(seed=2**64), headers=headers()), 400, "invalid_value"),
        (dict(json=chat_body(seed=2**63 - 1, n=2), headers=headers()), 400, "invalid_value"),
        (dict(data=json.dumps(chat_body()).replace('"temperature": 0', '"temperature": NaN').encode(),
              headers=json_headers), 400, "invalid_value"),
        (dict(data=json.dumps(chat_body("bad \ud800 text")).encode(), headers=json_headers), 400,
         "invalid_value"),
        (dict(json=chat_body(tools=[{"type": "function", "function": {"name": "f"}}]), headers=headers()), 400,
         "unsupported_parameter"),
    ]
    for kwargs, status, code in cases:
        reply = requests.post(url, timeout=60, **kwargs)
        assert reply.status_code == status, (code, reply.text)
        error = reply.json()["error"]
        assert error["code"] == code and error["message"] and set(error) == {"message", "type", "param", "code"}
    context_error = requests.post(url, json=chat_body("hello " * 9000), headers=headers(), timeout=60).json()
    assert "maximum context length is 8192" in context_error["error"]["message"]
    assert requests.post(url, json=chat_body(), headers=headers(), timeout=120).status_code == 200


def stream_one(base: str, i: int) -> tuple[str, float]:
    reply = requests.post(f"{base}/v1/chat/completions", headers=headers(), stream=True, timeout=300,
                          json=chat_body(f"Tell me one fact about the number {i}.", stream=True, temperature=0.7,
                                         seed=i, max_tokens=6))
    assert reply.status_code == 200, reply.text
    text, done = [], False
    for line in reply.iter_lines():
        if line == b"data: [DONE]":
            done = True
        elif line.startswith(b"data: "):
            event = json.loads(line[6:])
            assert "error" not in event, event
            text += [c["delta"].get("content", "") for c in event["choices"]]
    assert done
    return "".join(text)


def test_eight_concurrent_streaming_clients(stack):
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: stream_one(stack["base"], i), range(16)))
    assert len(answers) == 16 and all(a.strip() for a in answers)


def test_web_page_streams_an_answer(stack, tmp_path):
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("Chromium is not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,700"):
        options.add_argument(flag)
    log = tmp_path / "chromedriver.log"
    driver = webdriver.Chrome(service=Service(driver_path, log_output=str(log)), options=options)
    try:
        driver.get(stack["base"] + "/")
        driver.find_element(By.ID, "apikey").send_keys(KEY)
        driver.execute_script("loadModels()")
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "model").get_attribute("value") == MODEL)
        driver.find_element(By.ID, "temperature").clear()
        driver.find_element(By.ID, "temperature").send_keys("0")
        driver.find_element(By.ID, "input").send_keys("What is the capital of France?")
        driver.find_element(By.ID, "send").click()
        states, deadline = [], time.monotonic() + 180
        while not driver.find_elements(By.CSS_SELECTOR, ".msg.done") and time.monotonic() < deadline:
            states += [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")]
            time.sleep(0.05)
        answer = WebDriverWait(driver, 5).until(ec.presence_of_element_located((By.CSS_SELECTOR, ".msg.done")))
        text = answer.text
        shot = Path(os.environ.get("DS_VICUNA_SCREENSHOT_DIR", tmp_path)) / "chat_page.png"
        driver.save_screenshot(str(shot))
        print(f"screenshot: {shot}")
        answer_class = answer.get_attribute("class")
        answer_box, scale = answer.rect, driver.execute_script("return window.devicePixelRatio")
    except Exception:
        print(log.read_text()[-3000:] if log.exists() else "no chromedriver log")
        raise
    finally:
        driver.quit()
    assert "error" not in answer_class
    assert "Paris" in text
    partial = {t for t in states if t and t != text}
    assert partial and all(text.startswith(t) for t in partial), states  # seen growing, i.e. streamed
    assert 0.01 < ink_fraction(shot, answer_box, scale) < 0.6  # the answer is drawn where the page says it is


def ink_fraction(png: Path, box: dict, scale: float) -> float:
    """The share of pixels inside `box` (CSS pixels, as Selenium's `rect`) that stand out from the box's
    background colour: 0 for an empty or blank box, a few percent for a line of text."""
    from matplotlib.image import imread

    image = imread(str(png))[..., :3]  # [H, W, 3] floats in 0..1
    top, left = int(box["y"] * scale), int(box["x"] * scale)
    region = image[top:top + int(box["height"] * scale), left:left + int(box["width"] * scale)]
    assert region.size, f"the answer box {box} is outside the {image.shape[1]}x{image.shape[0]} screenshot"
    light = region.mean(-1)  # [h, w]
    return float((abs(light - float(sorted(light.ravel())[light.size // 2])) > 0.25).mean())


SECRET_HEADERS = {"X-Worker-Secret": SECRET}


def controller_workers(stack) -> list[str]:
    reply = requests.get(f"{stack['controller']}/status", headers=SECRET_HEADERS, timeout=10)
    return [w["address"] for w in reply.json()["workers"]]


def queue_length(address: str) -> int:
    return requests.get(f"{address}/worker_status", headers=SECRET_HEADERS, timeout=10).json()["queue_length"]


def test_internal_endpoints_refuse_calls_without_the_worker_secret(stack):
    worker = controller_workers(stack)[0]
    direct = requests.post(f"{worker}/worker_generate_stream", timeout=10,
                           json={"messages": [{"role": "user", "content": "hi"}], "params": {"max_tokens": 2}})
    assert direct.status_code == 403 and direct.json()["error"]["code"] == "invalid_worker_secret"
    for path in ("/status", "/list_models", "/"):
        assert requests.get(f"{stack['controller']}{path}", timeout=10).status_code == 403
    assert requests.post(f"{stack['controller']}/get_worker_address", json={"model": MODEL},
                         timeout=10).status_code == 403
    assert requests.get(f"{worker}/health", timeout=10).json() == {"status": "ok"}


def test_a_non_streaming_request_is_cancelled_when_its_client_goes_away(stack):
    import socket

    workers = controller_workers(stack)
    body = json.dumps(chat_body("Count from 1 to 500, separated by commas.", max_tokens=400)).encode()
    port = int(stack["base"].rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 60
        while sum(queue_length(w) for w in workers) == 0:  # generating now, and for many seconds more
            assert time.monotonic() < deadline, "the request never reached a worker"
            time.sleep(0.05)
    closed_at = time.monotonic()
    while sum(queue_length(w) for w in workers) > 0:  # 400 tokens take this model far longer than 3 s here
        assert time.monotonic() - closed_at < 3, "the job kept running after its client left"
        time.sleep(0.1)
    metrics = requests.get(f"{stack['base']}/metrics", headers=headers(), timeout=10).text
    assert 'ds_vicuna_requests_total{endpoint="/v1/chat/completions",status="499"} 1.0' in metrics


def test_killed_worker_is_dropped_and_requests_keep_succeeding(stack):
    second = stack["second"]
    deadline = time.monotonic() + 240
    while len(controller_workers(stack)) < 2:  # the second worker registers once its model is loaded
        assert second.poll() is None and time.monotonic() < deadline, "the second worker never registered"
        time.sleep(0.5)
    first_worker = next(line for line in stack["lines"] if line.startswith("controller at")).split()[4]
    second_address = next(a for a in controller_workers(stack) if a != first_worker)
    with ThreadPoolExecutor(8) as pool:
        futures = []
        deadline = time.monotonic() + 120
        while queue_length(second_address) == 0:  # until the second worker holds a request (a short reply may
            assert time.monotonic() < deadline, "no request reached the second worker"  # finish first: send more)
            if all(f.done() for f in futures):
                futures += [pool.submit(requests.post, f"{stack['base']}/v1/chat/completions", headers=headers(),
                                        json=chat_body(f"Count from 1 to {20 + i}.", max_tokens=48), timeout=300)
                            for i in range(len(futures), len(futures) + 4)]
            time.sleep(0.02)
        os.kill(second.pid, signal.SIGKILL)  # with requests in flight on it
        killed_at = time.monotonic()
        replies = [f.result() for f in futures]
    assert [r.status_code for r in replies] == [200] * len(replies), [r.text for r in replies]
    while len(controller_workers(stack)) != 1:
        assert time.monotonic() - killed_at < EXPIRY + 5, "the controller kept the dead worker"
        time.sleep(0.2)
    for i in range(3):
        reply = requests.post(f"{stack['base']}/v1/chat/completions", headers=headers(),
                              json=chat_body(f"Say {i}.", max_tokens=4), timeout=120)
        assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"]


def test_logprobs_and_prompt_scoring_match_the_model(stack):
    """Through the official client: greedy chat logprobs are the top alternatives, and an echoed prompt's
    log-probabilities equal a plain forward pass of the same model."""
    import torch
    from openai import OpenAI
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ds_vicuna.model.embedded import embedded_model_path

    client = OpenAI(base_url=f"{stack['base']}/v1", api_key=KEY, max_retries=0, timeout=120)
    reply = client.chat.completions.create(model=MODEL, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3,
                                           messages=[{"role": "user", "content": "What is the capital of France?"}])
    content = reply.choices[0].logprobs.content
    assert len(content) >= reply.usage.completion_tokens > 0
    for entry in content:  # greedy: each token is its position's most likely one
        assert len(entry.top_logprobs) == 3 and entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
    prompt = "The capital of France is Paris."
    scored = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=1).choices[0]
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_path())
    model = AutoModelForCausalLM.from_pretrained(embedded_model_path(), dtype=torch.float32).eval()
    ids = tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        logprobs = model(torch.tensor([ids])).logits[0].log_softmax(-1)  # [T, V]
    expected = [float(logprobs[i - 1, ids[i]]) for i in range(1, len(ids))]
    assert scored.text == prompt and scored.logprobs.token_logprobs[0] is None
    assert scored.logprobs.token_logprobs[1:] == pytest.approx(expected, abs=1e-3)
    assert scored.logprobs.tokens == [tokenizer.decode([i]) for i in ids]
