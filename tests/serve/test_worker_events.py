"""The worker -> API event protocol: every event survives a round trip; anything else is a ProtocolError."""
from __future__ import annotations

import math

import pytest

from ds_vicuna.serve.worker_events import (DoneEvent, ErrorEvent, ProtocolError, TextEvent, TokenLogprob, is_final,
                                      parse_job_line, parse_line, to_line)

EVENTS = [
    TextEvent("Hel"),
    TextEvent("lo", tokens=2),
    TextEvent("naïve 🙂 \n\"quoted\"", (TokenLogprob(" na", -0.5, ((" na", -0.5), (" the", -1.25))),)),
    DoneEvent("stop", 12, 3),
    DoneEvent("length", 4, 2, logprobs=(TokenLogprob("x", -2.0),),
              prompt_logprobs=(TokenLogprob("<s>", None), TokenLogprob("Hi", -3.5, (("Hi", -3.5),)))),
    ErrorEvent("generation failed: RuntimeError: boom"),
    ErrorEvent("the queue is full", "queue_full"),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: type(e).__name__)
def test_round_trip(event):
    line = to_line(event)
    assert line.endswith(b"\n") and line.count(b"\n") == 1  # one event, one line
    assert parse_line(line) == event
    assert parse_line(line.decode()) == event


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: type(e).__name__)
def test_batch_lines_name_their_job(event):
    line = to_line(event, job=5)
    assert parse_job_line(line) == (5, event)
    assert parse_line(line) == event  # the job tag is extra, not a different event


@pytest.mark.parametrize("line", [to_line(TextEvent("x")), b'{"text": "x", "job": -1}', b'{"text": "x", "job": "1"}',
                                  b'{"text": "x", "job": true}', b'{"text": "x", "tokens": -2, "job": 0}'])
def test_a_batch_line_without_a_valid_job_or_count_is_a_protocol_error(line):
    with pytest.raises(ProtocolError):
        parse_job_line(line)


def test_final_events():
    assert [is_final(e) for e in EVENTS] == [False, False, False, True, True, True, True]


def test_minus_infinity_is_written_as_openai_writes_it():
    line = to_line(TextEvent("a", (TokenLogprob("a", -math.inf, (("a", -math.inf),)),)))
    event = parse_line(line)
    assert event.logprobs[0].logprob == -9999.0 and event.logprobs[0].top == (("a", -9999.0),)


def test_error_event_of_older_workers_is_read():
    assert parse_line(b'{"error": "boom"}') == ErrorEvent("boom")


@pytest.mark.parametrize("line", [b"not json", b"[1, 2]", b'{"text": 3}', b'{"done": {"finish_reason": "stop"}}',
                                  b'{"done": {"finish_reason": "stop", "prompt_tokens": -1, "completion_tokens": 0}}',
                                  b'{"error": 5}', b'{"what": 1}', b'{"text": "a", "logprobs": [{"token": "a"}]}',
                                  b'{"text": "a", "logprobs": {"token": "a"}}', b"\xff\xfe"])
def test_bad_lines_are_protocol_errors(line):
    with pytest.raises(ProtocolError):
        parse_line(line)
