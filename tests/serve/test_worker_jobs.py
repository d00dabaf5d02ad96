"""The Worker's intake and scheduler: the params contract, queue-full 429, the raw-prompt branch, bad jobs and
injected failures that leave it serving, a dead scheduler that takes it out, and multi-turn fidelity through the
API (a 3-turn chat renders its history exactly as the model generated it)."""
from __future__ import annotations

import time

import pytest
from tests.support.serve_helpers import fail_forward, force_tokens, random_llama

from ds_vicuna.model.loading import ChatModel
from ds_vicuna.serve.jobs import GenerationJob
from ds_vicuna.serve.sampling import SamplingParams
from ds_vicuna.serve.worker_events import DoneEvent, ErrorEvent
from ds_vicuna.serve.errors import APIError, ErrorCode
from ds_vicuna.serve.worker import Worker, create_app

CHAT = [{"role": "user", "content": "Who are you?"}]


@pytest.fixture(scope="module")
def chat(smol_tokenizer):
    return ChatModel.build(random_llama(smol_tokenizer), smol_tokenizer, "vicuna_v1.1", name="tiny")


@pytest.fixture
def worker(chat):
    worker = Worker(chat, "http://127.0.0.1:1", None, http=None, max_batch_size=4, max_queue=3)
    yield worker
    worker.stop()


def wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def run(worker: Worker, job: GenerationJob) -> list:
    worker.submit(job)
    return list(worker.stream(job, poll=0.1))


# ---- intake -------------------------------------------------------------------------------------------------
def test_make_job_follows_the_params_contract(worker, chat, smol_tokenizer):
    job = worker.make_job({"messages": CHAT, "params": {"max_tokens": 5, "temperature": 0.5, "top_p": 0.9,
                                                        "seed": 2 ** 63 - 1, "stop": ["END"], "logprobs": True,
                                                        "top_logprobs": 20, "echo": False}})
    assert job.prompt_ids == chat.encoder.encode_prompt(CHAT)
    assert job.params == SamplingParams(5, 0.5, 0.9, 2 ** 63 - 1, ("END", "<|im_end|>"), True, 20, False)
    assert job.reply_lead == " "  # chat replies drop the template's lead
    # the raw-prompt branch: the text continued as it is, no template stops, no lead
    raw = worker.make_job({"prompt": "The capital of France is", "params": {"max_tokens": 0, "echo": True,
                                                                            "logprobs": True}})
    assert raw.prompt_ids == smol_tokenizer("The capital of France is")["input_ids"]
    assert (raw.params.stop, raw.reply_lead, raw.params.max_tokens) == ((), "", 0)
    assert worker.make_job({"prompt": "x"}).params.max_tokens == 256  # the default


@pytest.mark.parametrize("params, code, param", [
    ({"seed": 2 ** 64}, ErrorCode.INVALID_VALUE, "seed"),
    ({"seed": -1}, ErrorCode.INVALID_VALUE, "seed"),
    ({"temperature": float("nan")}, ErrorCode.INVALID_VALUE, "temperature"),
    ({"top_p": 0}, ErrorCode.INVALID_VALUE, "top_p"),
    ({"top_p": float("inf")}, ErrorCode.INVALID_VALUE, "top_p"),
    ({"top_logprobs": 21}, ErrorCode.INVALID_VALUE, "top_logprobs"),
    ({"max_tokens": 0}, ErrorCode.INVALID_VALUE, "max_tokens"),
    ({"max_tokens": 9000}, ErrorCode.CONTEXT_LENGTH_EXCEEDED, "messages"),
    ({"logprobs": "yes"}, ErrorCode.INVALID_TYPE, "logprobs"),
    ({"stop": "END"}, ErrorCode.INVALID_TYPE, "stop"),
])
def test_a_bad_param_is_a_400_naming_it(worker, params, code, param):
    with pytest.raises(APIError) as caught:
        worker.make_job({"messages": CHAT, "params": params})
    assert (caught.value.code, caught.value.param) == (code, param) and caught.value.code.status in (400,)


def test_bad_bodies_name_the_field(worker):
    for body, param in (({"prompt": ""}, "prompt"), ({}, "prompt"),
                        ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages")):
        with pytest.raises(APIError) as caught:
            worker.make_job(body)
        assert caught.value.param == param


def test_a_full_queue_is_429(worker):
    jobs = [worker.make_job({"messages": CHAT, "params": {"max_tokens": 2}}) for _ in range(4)]
    for job in jobs[:3]:
        worker.submit(job)  # the scheduler is not started: they wait
    with pytest.raises(APIError) as caught:
        worker.submit(jobs[3])
    assert caught.value.code is ErrorCode.QUEUE_FULL and caught.value.code.status == 429
    reply = create_app(worker).test_client().post("/worker_generate_stream",
                                                  json={"messages": CHAT, "params": {"max_tokens": 2}})
    assert reply.status_code == 429 and reply.get_json()["error"]["code"] == "queue_full"
    worker.start()  # once the scheduler runs, the queue drains and new work is taken again
    for job in jobs[:3]:
        assert isinstance(list(worker.stream(job, poll=0.1))[-1], DoneEvent)
    wait_for(lambda: worker.queue_length() == 0)
    assert isinstance(run(worker, jobs[3])[-1], DoneEvent)


# ---- no request hurts another --------------------------------------------------------------------------------
def test_bad_jobs_and_injected_failures_leave_the_worker_serving(worker, chat, smol_tokenizer):
    worker.start()
    # a seed torch rejects, handed to the engine past make_job's check: that job's error, nothing else
    direct = GenerationJob(chat.encoder.encode_prompt(CHAT), SamplingParams(max_tokens=3, seed=2 ** 64))
    (event,) = run(worker, direct)
    assert isinstance(event, ErrorEvent) and event.code == "invalid_value"
    # an exception inside the model for one prompt: that job fails, the one beside it finishes
    poisoned = worker.make_job({"messages": [{"role": "user", "content": "zebra"}], "params": {"max_tokens": 3}})
    (marker,) = set(poisoned.prompt_ids) - set(chat.encoder.encode_prompt(CHAT))
    handle = fail_forward(chat.model, lambda kwargs: bool((kwargs["input_ids"] == marker).any()))
    try:
        fine = worker.make_job({"messages": CHAT, "params": {"max_tokens": 3, "temperature": 0}})
        worker.submit(poisoned)
        worker.submit(fine)
        assert isinstance(list(worker.stream(poisoned, poll=0.1))[-1], ErrorEvent)
        assert isinstance(list(worker.stream(fine, poll=0.1))[-1], DoneEvent)
    finally:
        handle.remove()
    events = run(worker, worker.make_job({"messages": CHAT, "params": {"max_tokens": 4, "temperature": 0}}))
    assert isinstance(events[-1], DoneEvent) and events[-1].completion_tokens == 4 and worker.healthy


def test_a_dead_scheduler_takes_the_worker_out_of_rotation(worker, monkeypatch):
    def broken_step():
        raise SystemError("the scheduler loop itself broke")

    monkeypatch.setattr(worker.engine, "step", broken_step)
    assert worker.healthy
    job = worker.make_job({"messages": CHAT, "params": {"max_tokens": 3}})
    worker.submit(job)
    worker.start()
    (event,) = list(worker.stream(job, poll=0.1))  # the client is told, not left hanging
    assert isinstance(event, ErrorEvent) and event.code == "worker_failed"
    wait_for(lambda: not worker.healthy)
    with pytest.raises(APIError) as caught:
        worker.submit(worker.make_job({"messages": CHAT, "params": {"max_tokens": 3}}))
    assert caught.value.code is ErrorCode.WORKER_FAILED


# ---- multi-turn fidelity through the API ---------------------------------------------------------------------
class _Reply:
    """A Flask test response as much like a `requests` response as the API uses."""

    def __init__(self, response):
        self.status_code, self._response = response.status_code, response

    def json(self):
        return self._response.get_json(silent=True)

    def iter_lines(self):
        yield from self._response.get_data().split(b"\n")

    def raise_for_status(self):
        assert self.status_code == 200

    def close(self):
        self._response.close()


class _Bridge:
    """`requests`-like HTTP to the in-process controller and worker Flask apps."""

    def __init__(self, apps: dict):
        self.clients = {prefix: app.test_client() for prefix, app in apps.items()}

    def _route(self, url):
        prefix = next(p for p in self.clients if url.startswith(p))
        return self.clients[prefix], url[len(prefix):]

    def get(self, url, timeout=None, **kwargs):
        client, path = self._route(url)
        return _Reply(client.get(path, headers=kwargs.get("headers")))

    def post(self, url, json=None, timeout=None, stream=False, headers=None, **kwargs):
        client, path = self._route(url)
        return _Reply(client.post(path, json=json, headers=headers))


def test_three_turn_chat_through_the_api_renders_history_as_the_model_wrote_it(chat, smol_tokenizer, monkeypatch):
    """The model writes " Reply N" then its stop token; the client gets "Reply N" (no lead, no stop string), sends
    it back as history, and the next prompt holds exactly the ids the model generated, then the stop token."""
    from ds_vicuna.serve.api_router import APIConfig
    from ds_vicuna.serve.api_router import create_app as api_app
    from ds_vicuna.serve.controller import Controller
    from ds_vicuna.serve.controller import create_app as controller_app

    worker = Worker(chat, "http://worker", None, http=None)
    seen = []
    make_job = worker.make_job
    monkeypatch.setattr(worker, "make_job", lambda body: seen.append(make_job(body)) or seen[-1])
    controller = Controller(heartbeat_expiry=600)
    controller.register("http://worker", ["tiny"])
    bridge = _Bridge({"http://controller": controller_app(controller), "http://worker": create_app(worker)})
    api = api_app(APIConfig("http://controller"), http=bridge).test_client()
    script: dict[int, int] = {}
    handle = force_tokens(chat.model, script)
    worker.start()
    try:
        messages, generated = [], []
        for turn in range(1, 4):
            messages.append({"role": "user", "content": f"Question {turn}?"})
            prompt = chat.encoder.encode_prompt(messages)
            reply_ids = smol_tokenizer(f" Reply {turn}", add_special_tokens=False)["input_ids"]
            script.clear()
            script.update({len(prompt) + k: t for k, t in enumerate(reply_ids + [smol_tokenizer.eos_token_id])})
            response = api.post("/v1/chat/completions", json={"model": "tiny", "messages": messages,
                                                              "max_tokens": 20, "temperature": 0})
            assert response.status_code == 200, response.get_data(as_text=True)
            choice = response.get_json()["choices"][0]
            assert choice["message"]["content"] == f"Reply {turn}" and choice["finish_reason"] == "stop"
            assert seen[-1].prompt_ids == prompt  # the worker built what training's encoder builds
            generated.append((prompt, reply_ids + [smol_tokenizer.eos_token_id]))
            messages.append({"role": "assistant", "content": choice["message"]["content"]})
        for (prompt, ids), (next_prompt, _) in zip(generated, generated[1:]):
            assert next_prompt[:len(prompt) + len(ids)] == prompt + ids  # history == what the model generated
    finally:
        handle.remove()
        worker.stop()
