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
