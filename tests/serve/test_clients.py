"""The official `openai` client against our API server over real HTTP (scripted workers behind the real
controller): logprobs parse into its types, errors become its exceptions, and it honours our `Retry-After`."""
from __future__ import annotations

import contextlib
import time

import pytest

from ds_vicuna.serve.api_router import APIConfig, create_app
from ds_vicuna.serve.controller import Controller
from ds_vicuna.serve.controller import create_app as controller_app
from tests.support.serve_fakes import CONTROLLER, SECRET, FakeHTTP, FakeResponse, logprob_worker, serve_app

openai = pytest.importorskip("openai")
KEY = "k"


@pytest.fixture
def served():
    """start(workers) -> (openai client factory, FakeHTTP); the API runs under waitress on 127.0.0.1."""
    with contextlib.ExitStack() as servers:
        def start(workers: dict):
            controller = Controller(heartbeat_expiry=60, secret=SECRET, registration_grace=0)
            for address in workers:
                controller.register(address, ["m"])
            http = FakeHTTP(controller_app(controller).test_client(), workers)
            app = create_app(APIConfig(CONTROLLER, (KEY,), worker_secret=SECRET), http=http)
            base = servers.enter_context(serve_app(app))

            def client(**kwargs):
                options = {"api_key": KEY, "timeout": 30, "max_retries": 0, **kwargs}
                return openai.OpenAI(base_url=f"{base}/v1", **options)

            return client, http

        yield start


def test_chat_logprobs_in_the_clients_types(served):
    client, _ = served({"http://w1": logprob_worker})
    reply = client().chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                             logprobs=True, top_logprobs=2)
    content = reply.choices[0].logprobs.content
    assert [(t.token, t.logprob) for t in content] == [("He", -0.5), ("llo", -0.25), ("<|im_end|>", -0.1)]
    assert [(t.token, t.logprob) for t in content[0].top_logprobs] == [("He", -0.5), ("Hi", -1.5)]
    assert bytes(content[1].bytes) == b"llo"
    stream = client().chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=3, logprobs=True, stream=True)
    tokens = [t.token for chunk in stream for choice in chunk.choices if choice.logprobs
              for t in choice.logprobs.content]
    assert tokens == ["He", "llo", "<|im_end|>"]


def test_prompt_scoring_with_echo(served):
    client, _ = served({"http://w1": logprob_worker})
    reply = client().completions.create(model="m", prompt="Say hi", max_tokens=0, echo=True, logprobs=1)
    choice = reply.choices[0]
    assert choice.text == "Say hi" and choice.logprobs.token_logprobs == [None, -2.0]
    assert choice.logprobs.top_logprobs == [None, {" hi": -2.0, " yo": -2.5}]
    assert choice.logprobs.text_offset == [0, 3]


def test_errors_become_the_clients_exceptions(served):
    client, _ = served({"http://w1": logprob_worker})
    with pytest.raises(openai.BadRequestError) as err:
        client().chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], seed=2**64)
    assert err.value.body["param"] == "seed" and err.value.body["code"] == "invalid_value"
    with pytest.raises(openai.BadRequestError) as err:
        client().chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                         tools=[{"type": "function", "function": {"name": "f"}}])
    assert err.value.body["param"] == "tools"
    with pytest.raises(openai.NotFoundError):
        client().chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.AuthenticationError):
        client(api_key="wrong").models.list()


@pytest.mark.parametrize("stream", [False, True])
def test_a_full_queue_is_retried_after_retry_after(served, stream):
    """The client retries a 429 after the `Retry-After` we send (1 s), then gives up with RateLimitError."""
    full = {"error": {"message": "queue full", "type": "rate_limit_error", "param": None, "code": "queue_full"}}
    attempts: list[float] = []

    def busy(body):
        attempts.append(time.monotonic())
        return FakeResponse(429, full)

    client, _ = served({"http://w1": busy})
    with pytest.raises(openai.RateLimitError) as err:
        client(max_retries=1).chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                                      stream=stream)
    assert err.value.response.headers["retry-after"] == "1"
    assert len(attempts) == 2 and attempts[1] - attempts[0] >= 0.9
