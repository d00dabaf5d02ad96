"""OpenAI message shapes -> the plain Message form: text parts joined, `developer` read as `system`."""
from __future__ import annotations

import pytest

from ds_vicuna.chat.messages import ContentPartError, MessageError, Role, flatten_openai_message, validate_messages


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


def test_an_assistant_refusal_part_is_text_it_said():
    raw = {"role": "assistant", "content": [{"type": "text", "text": "No."}, {"type": "refusal", "refusal": "Sorry."}]}
    assert flatten_openai_message(raw)["content"] == "No.\nSorry."


@pytest.mark.parametrize("part,words,non_text", [
    ({"type": "image_url", "image_url": {"url": "http://x/cat.png"}}, "'image_url'", True),
    ({"type": "text", "text": 3}, "without a string 'text'", False),
    ({"type": "refusal", "text": "x"}, "without a string 'refusal'", False),
    ("just a string", "must be an object with a string 'type' (got a str)", False),
    ({"type": ["text"], "text": "x"}, "(got 'type' of type list)", False),
    ({"text": "x"}, "(got no 'type')", False),
])
def test_parts_other_than_text_are_named(part, words, non_text):
    with pytest.raises(ContentPartError) as err:
        flatten_openai_message({"role": "user", "content": [{"type": "text", "text": "a"}, part]}, "messages[2]")
    assert str(err.value).startswith("messages[2].content[1]:") and words in str(err.value)
    assert isinstance(err.value, MessageError) and err.value.non_text is non_text
