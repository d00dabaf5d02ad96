"""The chat/completions logic (`serve.serving`) behind the API with scripted workers: responses and streams in
OpenAI's shapes, logprobs and echo, n choices, and clients that go away."""
from __future__ import annotations

import pytest

from ds_vicuna.serve.openai_protocol import iter_sse
from tests.support.serve_fakes import CHAT, EndlessResponse, FakeResponse, logprob_worker, ok_worker


def test_chat_completion_and_stream(stack):
    client, _ = stack({"http://w1": ok_worker})
    reply = client.post("/v1/chat/completions", json=CHAT)
    body = reply.get_json()
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello!"}
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    reply = client.post("/v1/chat/completions", json={**CHAT, "stream": True, "n": 2,
                                                       "stream_options": {"include_usage": True}})
    assert reply.mimetype == "text/event-stream"
    raw = reply.get_data()
    assert raw.rstrip().endswith(b"data: [DONE]")
    chunks = list(iter_sse(raw.split(b"\n")))
    text = {0: "", 1: ""}
    for chunk in chunks[:-1]:
        for choice in chunk["choices"]:
            text[choice["index"]] += choice["delta"].get("content", "")
    assert text == {0: "Hello!", 1: "Hello!"}
    assert chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}


def test_completion_endpoint(stack):
    client, _ = stack({"http://w1": ok_worker})
    body = client.post("/v1/completions", json={"model": "m", "prompt": "Say", "max_tokens": 3}).get_json()
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == "Hello!"
    assert body["choices"][0]["logprobs"] is None


def test_chat_logprobs_and_top_logprobs(stack):
    client, _ = stack({"http://w1": logprob_worker})
    body = client.post("/v1/chat/completions", json={**CHAT, "logprobs": True, "top_logprobs": 2}).get_json()
    choice = body["choices"][0]
    assert choice["message"]["content"] == "Hello"
    content = choice["logprobs"]["content"]
    assert [(c["token"], c["logprob"]) for c in content] == [("He", -0.5), ("llo", -0.25), ("<|im_end|>", -0.1)]
    assert content[0]["bytes"] == list(b"He")
    assert content[0]["top_logprobs"] == [{"token": "He", "logprob": -0.5, "bytes": list(b"He")},
                                          {"token": "Hi", "logprob": -1.5, "bytes": list(b"Hi")}]
    plain = client.post("/v1/chat/completions", json=CHAT).get_json()
    assert plain["choices"][0]["logprobs"] is None
    reply = client.post("/v1/chat/completions", json={**CHAT, "logprobs": True, "stream": True})
    chunks = [c for c in iter_sse(reply.get_data().split(b"\n")) if c["choices"]]
    streamed = [entry["token"] for c in chunks if c["choices"][0]["logprobs"]
                for entry in c["choices"][0]["logprobs"]["content"]]
    assert streamed == ["He", "llo", "<|im_end|>"]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}


def test_completion_echo_with_logprobs_scores_a_prompt_as_lm_eval_reads_it(stack):
    """lm-evaluation-harness `local-completions` sends echo + logprobs=1 + max_tokens=1 and reads
    `token_logprobs[ctxlen:-1]`, comparing each with `max(top_logprobs[i].values())` for greediness."""
    client, http = stack({"http://w1": logprob_worker})
    body = client.post("/v1/completions", json={"model": "m", "prompt": "Say hi", "max_tokens": 1, "echo": True,
                                                "logprobs": 1, "temperature": 0}).get_json()
    choice = body["choices"][0]
    assert choice["text"] == "Say hiHello"
    logprobs = choice["logprobs"]
    assert logprobs["tokens"] == ["Say", " hi", "He", "llo", "<|im_end|>"]
    assert logprobs["token_logprobs"] == [None, -2.0, -0.5, -0.25, -0.1]
    assert logprobs["top_logprobs"][0] is None
    assert logprobs["top_logprobs"][1] == {" hi": -2.0, " yo": -2.5}
    assert logprobs["top_logprobs"][2] == {"He": -0.5, "Hi": -1.5}
    assert logprobs["text_offset"] == [0, 3, 6, 8, 11]
    assert http.payloads[0]["params"]["echo"] is True and http.payloads[0]["params"]["top_logprobs"] == 1
    # prompt scoring alone: max_tokens 0 with echo
    body = client.post("/v1/completions", json={"model": "m", "prompt": "Say hi", "max_tokens": 0, "echo": True,
                                                "logprobs": 0}).get_json()
    assert body["choices"][0]["text"] == "Say hi" and body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["logprobs"]["token_logprobs"] == [None, -2.0]
    assert body["choices"][0]["logprobs"]["top_logprobs"][1] == {" hi": -2.0, " yo": -2.5}
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 0, "total_tokens": 2}


def test_token_id_prompts_in_a_batch(stack):
    """`prompt` as token ids, several at once (how lm-eval sends them): one choice per prompt and n."""
    client, http = stack({"http://w1": logprob_worker})
    body = client.post("/v1/completions", json={"model": "m", "prompt": [[5, 6], [7, 8]], "max_tokens": 3,
                                                "n": 2, "seed": 10}).get_json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert sorted((p["prompt_ids"], p["params"]["seed"]) for p in http.payloads) == [
        ([5, 6], 10), ([5, 6], 11), ([7, 8], 12), ([7, 8], 13)]
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 12, "total_tokens": 16}
    # echo of a token prompt: its text comes from the tokens' texts (the worker is asked for them)
    body = client.post("/v1/completions", json={"model": "m", "prompt": [5, 6], "max_tokens": 3,
                                                "echo": True}).get_json()
    assert body["choices"][0]["text"] == "Say hiHello" and body["choices"][0]["logprobs"] is None
    assert http.payloads[-1]["params"]["logprobs"] is True


def test_streamed_completion_logprobs_and_echo(stack):
    client, _ = stack({"http://w1": logprob_worker})
    reply = client.post("/v1/completions", json={"model": "m", "prompt": "Say hi", "max_tokens": 3, "logprobs": 1,
                                                 "stream": True})
    chunks = [c["choices"][0] for c in iter_sse(reply.get_data().split(b"\n"))]
    assert "".join(c["text"] for c in chunks) == "Hello"
    tokens = [(t, o) for c in chunks for t, o in zip(c["logprobs"]["tokens"], c["logprobs"]["text_offset"])]
    assert tokens == [("He", 0), ("llo", 2), ("<|im_end|>", 5)]
    reply = client.post("/v1/completions", json={"model": "m", "prompt": "Say hi", "max_tokens": 3, "echo": True,
                                                 "stream": True})
    assert "".join(c["choices"][0]["text"] for c in iter_sse(reply.get_data().split(b"\n"))) == "Say hiHello"


@pytest.mark.parametrize("n", [1, 3])
def test_client_disconnect_closes_every_worker_stream(stack, n):
    import time

    replies: list[EndlessResponse] = []

    def endless_worker(body):
        replies.append(EndlessResponse())
        return replies[-1]

    client, _ = stack({"http://w1": endless_worker})
    reply = client.post("/v1/chat/completions", json={**CHAT, "stream": True, "n": n}, buffered=False)
    stream = iter(reply.response)
    received = [next(stream) for _ in range(2 * n + 5)]  # role chunks, then tokens from every choice
    chunks = list(iter_sse(b"".join(received).split(b"\n")))
    assert len(replies) == n and any(c["choices"][0]["delta"].get("content") == "x" for c in chunks)
    reply.close()  # what the WSGI server does when the client goes away
    deadline = time.monotonic() + 5
    while not all(r.closed for r in replies) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [r.closed for r in replies] == [True] * n


def test_a_failed_choice_closes_the_choices_already_started(stack):
    replies: list[EndlessResponse] = []

    def second_fails(body):
        if replies:
            return FakeResponse(400, {"error": {"message": "prompt too long", "type": "invalid_request_error",
                                                "code": "context_length_exceeded"}})
        replies.append(EndlessResponse())
        return replies[-1]

    client, _ = stack({"http://w1": second_fails})
    closed_when_answered = []

    @client.application.after_request
    def probe(response):  # closed by the failure itself, not later when the garbage is collected
        closed_when_answered.append([r.closed for r in replies])
        return response

    reply = client.post("/v1/chat/completions", json={**CHAT, "stream": True, "n": 2})
    assert reply.status_code == 400
    assert closed_when_answered == [[True]]


def test_non_streaming_request_is_cancelled_when_its_client_goes_away(stack):
    import threading
    import time

    replies: list[EndlessResponse] = []

    def endless_worker(body):
        replies.append(EndlessResponse())
        return replies[-1]

    client, _ = stack({"http://w1": endless_worker})
    gone = threading.Event()
    threading.Timer(0.3, gone.set).start()
    started = time.monotonic()
    reply = client.post("/v1/chat/completions", json={**CHAT, "n": 2},
                        environ_overrides={"waitress.client_disconnected": gone.is_set})
    assert reply.status_code == 499 and time.monotonic() - started < 5
    assert len(replies) == 2 and all(r.closed for r in replies)


# ---- admission and one call per request --------------------------------------------------------------------
def metric_samples(client) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    text = client.get("/metrics").get_data(as_text=True)
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
            if not s.labels}


def test_a_requests_jobs_reach_one_worker_in_one_call(stack):
    client, http = stack({"http://w1": ok_worker, "http://w2": ok_worker})
    body = client.post("/v1/completions", json={"model": "m", "prompt": ["a", "b"], "n": 3, "max_tokens": 3})
    assert body.status_code == 200 and len(body.get_json()["choices"]) == 6
    assert len(http.calls) == 1 and len(http.payloads) == 6  # one worker call carrying all six jobs
    reply = client.post("/v1/chat/completions", json={**CHAT, "n": 4, "stream": True})
    assert reply.status_code == 200 and len(http.calls) == 2 and len(http.payloads) == 10


def test_too_many_jobs_in_a_request_is_a_400_before_any_work(stack):
    client, http = stack({"http://w1": ok_worker}, max_jobs_per_request=4)
    reply = client.post("/v1/completions", json={"model": "m", "prompt": ["Hi"] * 3, "n": 2, "max_tokens": 1})
    assert reply.status_code == 400
    err = reply.get_json()["error"]
    assert err["code"] == "invalid_value" and err["param"] == "n" and "at most 4" in err["message"]
    assert http.calls == []
    assert client.post("/v1/completions", json={"model": "m", "prompt": ["Hi"] * 2, "n": 2,
                                                "max_tokens": 1}).status_code == 200


def test_past_the_running_limit_a_request_is_429_at_once_and_its_place_comes_back(stack):
    import time

    replies: list[EndlessResponse] = []

    def endless_worker(body):
        replies.append(EndlessResponse())
        return replies[-1]

    client, http = stack({"http://w1": endless_worker}, max_running_requests=1)
    holding = client.post("/v1/chat/completions", json={**CHAT, "stream": True}, buffered=False)
    next(iter(holding.response))
    started = time.monotonic()
    refused = client.post("/v1/chat/completions", json=CHAT)
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
    assert time.monotonic() - started < 1 and len(http.calls) == 1  # refused before anything reached a worker
    samples = metric_samples(client)
    assert samples["ds_vicuna_running_requests"] == 1 and samples["ds_vicuna_queue_limit"] == 1
    holding.close()  # the client goes away: its place and its worker connection are given back
    assert replies[0].closed and metric_samples(client)["ds_vicuna_running_requests"] == 0
    never_read = client.post("/v1/chat/completions", json={**CHAT, "stream": True}, buffered=False)
    never_read.close()  # closed before its first chunk: the place comes back all the same
    assert replies[1].closed and metric_samples(client)["ds_vicuna_running_requests"] == 0


def test_metrics_count_a_dropped_streams_tokens_and_time_every_request(stack):
    replies: list[EndlessResponse] = []

    def endless_worker(body):
        replies.append(EndlessResponse())
        return replies[-1]

    client, _ = stack({"http://w1": endless_worker})
    reply = client.post("/v1/chat/completions", json={**CHAT, "stream": True}, buffered=False)
    chunks = iter(reply.response)
    received = [next(chunks) for _ in range(6)]  # the role chunk, then five tokens
    assert sum(b'"content": "x"' in c for c in received) == 5
    samples = metric_samples(client)
    assert samples["ds_vicuna_running_jobs"] == 1 and samples["ds_vicuna_queue_depth"] == 0
    reply.close()
    samples = metric_samples(client)
    assert samples["ds_vicuna_generation_tokens_total"] >= 5  # counted though the stream never finished
    assert samples["ds_vicuna_running_jobs"] == 0 and samples["ds_vicuna_running_requests"] == 0
    assert samples["ds_vicuna_request_duration_seconds_count"] == 1
    assert samples["ds_vicuna_time_to_first_token_seconds_count"] == 1
    assert samples["ds_vicuna_inter_token_latency_seconds_count"] >= 4
