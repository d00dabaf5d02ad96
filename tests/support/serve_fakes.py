"""Test fakes for the serving stack: scripted workers behind the real controller, and a real HTTP server for the
API app so clients nobody here wrote (the `openai` package, lm-evaluation-harness) can call it.

Every worker reply is written with the classes and `to_line` of `serve.worker_events`, as the real worker writes it.

    controller = Controller(heartbeat_expiry=60, secret=SECRET, registration_grace=0)
    http = FakeHTTP(controller_app(controller).test_client(), {"http://w1": lambda body: FakeResponse(200, ...)})
    with serve_app(create_app(APIConfig(CONTROLLER, worker_secret=SECRET), http=http)) as base_url: ...
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator

from ds_vicuna.serve.api_router import APIConfig, create_app
from ds_vicuna.serve.controller import Controller
from ds_vicuna.serve.controller import create_app as controller_app
from ds_vicuna.serve.openai_protocol import iter_sse
from ds_vicuna.serve.worker_events import DoneEvent, ProtocolError, TextEvent, TokenLogprob, parse_line, to_line

CONTROLLER = "http://controller"
SECRET = "s3cret"


class FakeResponse:
    """A `requests.Response` look-alike: a JSON body or event lines, optionally breaking after some lines."""

    def __init__(self, status: int, body=None, lines=(), broken_after: int | None = None):
        self.status_code, self._body, self._lines, self._broken_after = status, body, list(lines), broken_after

    def json(self):
        return self._body

    def iter_lines(self):
        for i, line in enumerate(self._lines):
            if self._broken_after is not None and i >= self._broken_after:
                raise ConnectionError("connection reset")
            yield line.rstrip(b"\n")
        if self._broken_after is not None:
            raise ConnectionError("connection reset")

    def close(self):
        pass

    def raise_for_status(self):
        assert self.status_code == 200


def events(*texts, finish="stop", prompt_tokens=3) -> list[bytes]:
    """A worker's reply lines: one text event per piece, then `done`."""
    return [to_line(TextEvent(t)) for t in texts] + [to_line(DoneEvent(finish, prompt_tokens, len(texts)))]


def lp(token: str, logprob, *top) -> TokenLogprob:
    return TokenLogprob(token, logprob, tuple(top))


def logprob_worker(body):
    """A worker that honours `logprobs`/`echo` the way the contract says: per-event tokens, held-back tokens in
    `done.logprobs`, one entry per prompt token (the first `None`) in `done.prompt_logprobs`."""
    params = body["params"]
    want, echo = params["logprobs"], params["echo"]
    prompt = (lp("Say", None), lp(" hi", -2.0, (" hi", -2.0), (" yo", -2.5))) if want and echo else ()
    if params["max_tokens"] == 0:
        return FakeResponse(200, lines=[to_line(DoneEvent("length", 2, 0, prompt_logprobs=prompt))])
    first = lp("He", -0.5, ("He", -0.5), ("Hi", -1.5)) if want else None
    second = lp("llo", -0.25, ("llo", -0.25), ("y", -2.0)) if want else None
    stop = lp("<|im_end|>", -0.1, ("<|im_end|>", -0.1), ("!", -3.0)) if want else None
    keep = lambda *tokens: tuple(t for t in tokens if t is not None)  # noqa: E731
    return FakeResponse(200, lines=[to_line(TextEvent("He", keep(first))), to_line(TextEvent("llo", keep(second))),
                                    to_line(DoneEvent("stop", 2, 3, logprobs=keep(stop), prompt_logprobs=prompt))])


class BatchResponse(FakeResponse):
    """A worker's answer to one batch call, made of one scripted reply per job: their lines interleaved (one from
    each in turn), each tagged with its job as the real worker tags them; closing it closes every reply."""

    def __init__(self, replies: list):
        super().__init__(200)
        self.replies = replies

    def iter_lines(self):
        streams = [(job, iter(reply.iter_lines())) for job, reply in enumerate(self.replies)]
        while streams:
            for item in list(streams):
                job, lines = item
                try:
                    line = next(lines)
                except StopIteration:
                    streams.remove(item)
                    continue
                try:
                    yield to_line(parse_line(line), job).rstrip(b"\n")
                except ProtocolError:
                    yield line  # garbage stays garbage

    def close(self):
        for reply in self.replies:
            reply.close()


class FakeHTTP:
    """`requests`-like: the controller is a Flask test client, each worker a function(job body) -> FakeResponse.

    A batch call (`/worker_generate_batch`) runs the worker's function once per job: any refusal (not 200) is the
    batch's answer (the replies already made are closed), else their lines come interleaved (`BatchResponse`).
    `controller_down` makes every controller call fail as a refused connection; `calls` records each worker
    call's address, `payloads` each job, `headers` each call's headers.
    """

    def __init__(self, controller_client, workers: dict):
        self.controller, self.workers, self.calls = controller_client, workers, []
        self.payloads, self.headers, self.controller_down = [], [], False
        self._lock = threading.Lock()  # the Flask test client is not meant for concurrent use

    def get(self, url, timeout=None, headers=None, **kwargs):
        if self.controller_down:
            raise ConnectionError("refused")
        with self._lock:
            reply = self.controller.get(url[len(CONTROLLER):], headers=headers)
        return FakeResponse(reply.status_code, reply.get_json())

    def post(self, url, json=None, timeout=None, stream=False, headers=None):
        if url.startswith(CONTROLLER):
            if self.controller_down:
                raise ConnectionError("refused")
            with self._lock:
                reply = self.controller.post(url[len(CONTROLLER):], json=json, headers=headers)
            return FakeResponse(reply.status_code, reply.get_json())
        address, endpoint = url.rsplit("/", 1)
        jobs = json["jobs"] if endpoint == "worker_generate_batch" else [json]
        with self._lock:
            self.calls.append(address)
            self.payloads.extend(jobs)
            self.headers.append(headers)
        behaviour = self.workers[address]
        if isinstance(behaviour, Exception):
            raise behaviour
        if endpoint != "worker_generate_batch":
            return behaviour(json)
        replies = []
        for job in jobs:
            reply = behaviour(job)
            if reply.status_code != 200:
                for made in replies:
                    made.close()
                return reply
            replies.append(reply)
        return BatchResponse(replies)


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def save_tiny_checkpoint(folder, tokenizer):
    """A random 2-layer Llama over `tokenizer` (e.g. SmolLM2's, with its chat template), saved as a checkpoint
    folder that `serve worker --model FOLDER` loads in a second: a working engine, not a good model."""
    from tests.support.serve_helpers import random_llama

    model = random_llama(tokenizer, max_positions=512)
    model.config.eos_token_id = model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@contextlib.contextmanager
def serve_app(app, threads: int = 8) -> Iterator[str]:
    """Serve a WSGI app with waitress on a free 127.0.0.1 port; yields its base URL, closes it after."""
    from ds_vicuna.serve.http_util import make_server, server_url

    server = make_server(app, "127.0.0.1", 0, threads)
    threading.Thread(target=server.run, daemon=True).start()
    try:
        yield server_url(server, "127.0.0.1")
    finally:  # no more connections; the loop thread ends once clients drop their keep-alive ones
        server.close()


# ---- an API server with scripted workers ------------------------------------------------------------------
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


FULL = {"error": {"message": "queue full", "type": "rate_limit_error", "param": None, "code": "queue_full"}}


def api_stack():
    """build(workers, **APIConfig fields) -> (API test client, FakeHTTP) over the real controller; the controller
    and the API share a secret (the `stack` fixture of tests/serve/conftest.py)."""
    clock = FakeClock()
    controller = Controller(heartbeat_expiry=60, secret=SECRET, clock=clock, registration_grace=0)
    http = FakeHTTP(controller_app(controller).test_client(), {})

    def build(workers: dict, **config):
        for address in workers:
            controller.register(address, ["m"])
        http.workers.update(workers)
        app = create_app(APIConfig(CONTROLLER, **{"worker_secret": SECRET, **config}), http=http, clock=clock)
        client = app.test_client()
        client.controller, client.clock = controller, clock
        return client, http

    return build


def ok_worker(body):
    return FakeResponse(200, lines=events("Hel", "lo", "!"))


def assert_error(reply, status: int, code: str, param=None):
    assert reply.status_code == status, reply.get_data(as_text=True)
    err = reply.get_json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["code"] == code
    assert err["param"] == param
    return err


def streamed_text(reply) -> str:
    return "".join(c["choices"][0]["delta"].get("content", "") for c in iter_sse(reply.get_data().split(b"\n"))
                   if c["choices"])


class EndlessResponse(FakeResponse):
    """A worker that would stream tokens forever; records when the API server closes its connection."""

    def __init__(self):
        super().__init__(200)
        self.closed = False

    def iter_lines(self):
        import time

        while not self.closed:
            yield to_line(TextEvent("x")).rstrip(b"\n")
            time.sleep(0.005)

    def close(self):
        self.closed = True
