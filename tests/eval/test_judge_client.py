"""ChatClient against the scripted fake server: retries, backoff, Retry-After, timeouts, give-up."""
import random
import socket

import pytest
from tests.support.fake_openai_judge import start_server

from ds_vicuna.eval.judge_client import ChatClient, JudgeAPIError, RetryPolicy, map_concurrent, retry_after_seconds


@pytest.fixture(scope="module")
def server():
    srv, state = start_server()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1", state
    srv.shutdown()


def _client(base_url, sleeps, **kwargs):
    retry = kwargs.pop("retry", RetryPolicy(max_attempts=4, base_wait=0.5, max_wait=8))
    return ChatClient(base_url, "judge", api_key="sk-test", retry=retry, sleep=sleeps.append,
                      rng=random.Random(0), **kwargs)


def _ask(client, text):
    return client.complete([{"role": "user", "content": text}], max_tokens=16)


def test_429_honours_retry_after_zero_instead_of_backoff(server):
    base_url, state = server
    sleeps = []
    assert _ask(_client(base_url, sleeps), "hello #fake:429x2").startswith("reply to: hello")
    assert sleeps == [0.0, 0.0]
    assert "Bearer sk-test" in state.auth


def test_retry_after_seconds_header_sets_the_wait(server):
    sleeps = []
    _ask(_client(server[0], sleeps), "ra #fake:429x1ra")
    assert sleeps == [1.0]


def test_500_retried_with_jittered_exponential_backoff(server):
    sleeps = []
    assert _ask(_client(server[0], sleeps), "boom #fake:500x3").startswith("reply to")
    assert len(sleeps) == 3
    for retry, wait in enumerate(sleeps):  # full jitter: uniform in [0, base * 2**retry]
        assert 0 <= wait <= 0.5 * 2 ** retry


def test_timeout_is_retried(server):
    sleeps = []
    client = _client(server[0], sleeps, timeout=0.5)
    assert _ask(client, "slow one #fake:slowx1").startswith("reply to")
    assert len(sleeps) == 1


def test_gives_up_after_max_attempts(server):
    base_url, state = server
    before = state.statuses.get("500", 0)
    sleeps = []
    with pytest.raises(JudgeAPIError, match="gave up after 3 attempts.*HTTP 500"):
        _ask(_client(base_url, sleeps, retry=RetryPolicy(max_attempts=3, base_wait=0.01)), "down #fake:500x99")
    assert state.statuses["500"] - before == 3 and len(sleeps) == 2


def test_connection_refused_is_retried_then_fails():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed when the block ends: nothing listens there
    sleeps = []
    with pytest.raises(JudgeAPIError, match="ConnectionError"):
        _ask(_client(f"http://127.0.0.1:{port}/v1", sleeps, retry=RetryPolicy(max_attempts=3, base_wait=0.01)), "x")
    assert len(sleeps) == 2


def test_client_error_fails_at_once(server):
    base_url, state = server
    before = state.statuses.get("400", 0)
    sleeps = []
    with pytest.raises(JudgeAPIError, match="HTTP 400"):
        _ask(_client(base_url, sleeps), "bad request #fake:400x5")
    assert sleeps == [] and state.statuses["400"] - before == 1


def test_retry_after_parsing():
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0


def test_from_env_flags_override_env(monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", "http://env:1/v1/")
    monkeypatch.setenv("DS_VICUNA_JUDGE_MODEL", "env-judge")
    monkeypatch.setenv("OPENAI_API_KEY", "env-key")
    client = ChatClient.from_env(None, None, None)
    assert (client.base_url, client.model, client.api_key) == ("http://env:1/v1", "env-judge", "env-key")
    assert ChatClient.from_env("http://flag/v1", "flag-judge", "k").model == "flag-judge"
    monkeypatch.delenv("DS_VICUNA_JUDGE_MODEL")
    with pytest.raises(ValueError, match="DS_VICUNA_JUDGE_MODEL"):
        ChatClient.from_env(None, None, None)


def test_map_concurrent_yields_every_item_with_errors_separate():
    def fn(x):
        if x == 3:
            raise RuntimeError("three")
        return x * x

    out = {item: (result, error) for item, result, error in map_concurrent(fn, range(20), workers=3)}
    assert set(out) == set(range(20))
    assert out[4] == (16, None) and isinstance(out[3][1], RuntimeError)
