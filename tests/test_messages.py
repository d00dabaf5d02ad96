"""OpenAI message shapes -> the plain Message form: text parts joined, `developer` read as `system`."""
from __future__ import annotations

import pytest

from ds_vicuna.messages import MessageError, Role, flatten_openai_message, validate_messages


def test_text_parts_are_joined_and_developer_is_system():
    raw = [{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
           {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}]
    messages = validate_messages([flatten_openai_message(m, f"messages[{i}]") for i, m in enumerate(raw)])
    assert [(m.role, m.content) for m in messages] == [(Role.SYSTEM, "Be brief."), (Role.USER, "one\ntwo")]


def test_plain_messages_and_non_messages_pass_through_unchanged():
    plain = {"role": "user", "content": "hi"}
    assert flatten_openai_message(plain) is plain
    assert flatten_openai_message("not a message") == "not a message"
    assert flatten_openai_message({"role": ["odd"], "content": "x"}) == {"role": ["odd"], "content": "x"}


@pytest.mark.parametrize("part,words", [
    ({"type": "image_url", "image_url": {"url": "http://x/cat.png"}}, "'image_url'"),
    ({"type": "text", "text": 3}, "without a string 'text'"),
    ("just a string", "'str'"),
])
def test_parts_other_than_text_are_named(part, words):
    with pytest.raises(MessageError) as err:
        flatten_openai_message({"role": "user", "content": [{"type": "text", "text": "a"}, part]}, "messages[2]")
    assert str(err.value).startswith("messages[2].content[1]:") and words in str(err.value)
