"""The internal conversation form every stage shares: a list of `Message(role, content)`.

ShareGPT (`from`/`value`) and OpenAI (`role`/`content`) records are normalised into it by
`ds_vicuna.formats`; templates, encoding, serving and eval only ever see this form.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence, Union


class Role(str, enum.Enum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"


class MessageError(ValueError):
    """A conversation that breaks the structure rules; the message names the offending field."""


@dataclass(frozen=True)
class Message:
    role: Role
    content: str

    def as_dict(self) -> dict:
        return {"role": self.role.value, "content": self.content}


MessageLike = Union[Message, Mapping[str, object]]

# OpenAI's newer name for system instructions (sent by o1-era clients and LangChain).
ROLE_ALIASES = {"developer": Role.SYSTEM.value}


def flatten_openai_message(raw: object, where: str = "message") -> object:
    """An OpenAI chat message in the plain `{"role", "content"}` form: text parts joined, `developer` -> `system`.

    OpenAI clients (LangChain among them) may send `content` as a list of parts `[{"type": "text", "text": ...}]`;
    the texts are joined with a newline, as FastChat and vLLM join them. Anything that is not such a message is
    returned unchanged, for `to_message` to judge.

    Raises:
        MessageError: a part that is not text (images, audio, ...), naming `where` and the part's index.
    """
    if not isinstance(raw, Mapping):
        return raw
    role, content = raw.get("role"), raw.get("content")
    alias = ROLE_ALIASES.get(role) if isinstance(role, str) else None
    if not isinstance(content, list) and alias is None:
        return raw
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            if kind != "text" or not isinstance(part.get("text"), str):
                got = "a text part without a string 'text'" if kind == "text" else f"{kind!r}"
                raise MessageError(f"{where}.content[{j}]: only text parts ({{'type': 'text', 'text': '...'}}) are "
                                   f"supported, got {got}")
            texts.append(part["text"])
        content = "\n".join(texts)
    return {**raw, "role": alias or role, "content": content}


def to_message(raw: MessageLike, where: str = "message") -> Message:
    """Turn a `{"role", "content"}` mapping (or a Message) into a Message.

    Raises:
        MessageError: unknown role or non-string content, naming `where`.
    """
    if isinstance(raw, Message):
        return raw
    if not isinstance(raw, Mapping):
        raise MessageError(f"{where}: expected an object with 'role' and 'content', got {type(raw).__name__}")
    role, content = raw.get("role"), raw.get("content")
    try:
        role = Role(role)
    except ValueError:
        raise MessageError(f"{where}.role: unknown role {role!r} (expected system, user or assistant)") from None
    if not isinstance(content, str):
        raise MessageError(f"{where}.content: expected a string, got {type(content).__name__}")
    return Message(role, content)


def validate_messages(messages: Iterable[MessageLike], *, require_final_user: bool = False) -> list[Message]:
    """The one structure gate: optional system first, then user/assistant strictly alternating from user.

    Args:
        messages: mappings or Messages.
        require_final_user: the serving side asks for a reply, so the last message must be the user's.

    Returns:
        The conversation as a list of Message.

    Raises:
        MessageError: naming the index and field that break the rules.
    """
    out = [to_message(m, f"messages[{i}]") for i, m in enumerate(messages)]
    if not out:
        raise MessageError("messages: the conversation is empty")
    turns = out[1:] if out[0].role is Role.SYSTEM else out
    offset = len(out) - len(turns)
    if not turns:
        raise MessageError("messages: a system message alone is not a conversation")
    for i, message in enumerate(turns):
        expected = Role.USER if i % 2 == 0 else Role.ASSISTANT
        if message.role is not expected:
            raise MessageError(f"messages[{i + offset}].role: expected {expected.value!r} (system first, then "
                               f"user and assistant alternating), got {message.role.value!r}")
    if require_final_user and out[-1].role is not Role.USER:
        raise MessageError(f"messages[{len(out) - 1}].role: the last message must be the user's to ask for a reply")
    return out


def as_dicts(messages: Sequence[Message]) -> list[dict]:
    return [m.as_dict() for m in messages]
