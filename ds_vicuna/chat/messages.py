"""The internal conversation form every stage shares: a list of `Message(role, content)`.

ShareGPT (`from`/`value`) and OpenAI (`role`/`content`) records are normalised into it by
`ds_vicuna.data.formats`; templates, encoding, serving and eval only ever see this form.
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
    """One turn.

    Attributes:
        role: who speaks.
        content: the text.
        weight: 1 = an assistant reply is trained on; 0 = it stays in the context but carries no label (OpenAI's
            fine-tuning `weight`). Always 1 for system and user turns.
        truncated: an assistant reply cut short to fit the training length (`ds-vicuna data split`): its text is
            trained on, but the stop token after it is not, so the model never learns to stop mid-word.
    """

    role: Role
    content: str
    weight: int = 1
    truncated: bool = False

    def __post_init__(self):
        if self.weight not in (0, 1) or isinstance(self.weight, bool):
            raise MessageError(f"weight must be 0 or 1, got {self.weight!r}")
        if self.role is not Role.ASSISTANT and (self.weight != 1 or self.truncated):
            raise MessageError(f"weight and truncated apply to assistant messages only, not {self.role.value!r}")

    @property
    def trained(self) -> bool:
        """An assistant reply that carries labels (weight 1)."""
        return self.role is Role.ASSISTANT and self.weight == 1

    def as_dict(self) -> dict:
        return {"role": self.role.value, "content": self.content}


MessageLike = Union[Message, Mapping[str, object]]

# OpenAI's newer name for system instructions (sent by o1-era clients and LangChain).
ROLE_ALIASES = {"developer": Role.SYSTEM.value}
# OpenAI content part type -> the field that holds its text (an assistant's refusal is text it said).
TEXT_PARTS = {"text": "text", "refusal": "refusal"}


class ContentPartError(MessageError):
    """A content part that is not text (`non_text`: image, audio, file, ...) or whose text is not a string."""

    def __init__(self, message: str, non_text: bool):
        super().__init__(message)
        self.non_text = non_text


def join_content_parts(parts: list, where: str = "content") -> str:
    """OpenAI content parts -> one text: the text (and refusal) parts joined with a newline, as FastChat and vLLM
    join them. The one rule for the API (`serve.openai_protocol`) and the data files (`ds_vicuna.data.formats`).

    Raises:
        ContentPartError: naming `where[index]` and the part's type.
    """
    texts = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if not isinstance(kind, str):  # malformed, not another kind of content
            raise ContentPartError(f"{where}[{j}]: a content part must be an object with a string 'type' (got "
                                   f"{_describe(part)})", non_text=False)
        if kind not in TEXT_PARTS:
            raise ContentPartError(f"{where}[{j}]: content part of type {kind!r}: only text parts "
                                   "({'type': 'text', 'text': '...'}) and refusals are supported", non_text=True)
        text = part.get(TEXT_PARTS[kind])
        if not isinstance(text, str):
            raise ContentPartError(f"{where}[{j}]: a {kind} part without a string {TEXT_PARTS[kind]!r} (got "
                                   f"{type(text).__name__})", non_text=False)
        texts.append(text)
    return "\n".join(texts)


def _describe(part: object) -> str:
    if isinstance(part, Mapping):
        kind = part.get("type")
        return "no 'type'" if kind is None else f"'type' of type {type(kind).__name__}"
    return f"a {type(part).__name__}"


def flatten_openai_message(raw: object, where: str = "message") -> object:
    """An OpenAI chat message in the plain `{"role", "content"}` form: text parts joined (`join_content_parts`),
    `developer` -> `system`.

    OpenAI clients (LangChain among them) may send `content` as a list of parts `[{"type": "text", "text": ...}]`.
    Anything that is not such a message is returned unchanged, for `to_message` to judge.

    Raises:
        ContentPartError: a part that is not text (images, audio, ...), naming `where` and the part's index.
    """
    if not isinstance(raw, Mapping):
        return raw
    role, content = raw.get("role"), raw.get("content")
    alias = ROLE_ALIASES.get(role) if isinstance(role, str) else None
    if not isinstance(content, list) and alias is None:
        return raw
    if isinstance(content, list):
        content = join_content_parts(content, f"{where}.content")
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
    weight, truncated = raw.get("weight", 1), raw.get("truncated", False)
    if isinstance(weight, bool) or weight not in (0, 1):
        raise MessageError(f"{where}.weight: expected 0 or 1, got {weight!r}")
    if not isinstance(truncated, bool):
        raise MessageError(f"{where}.truncated: expected true or false, got {truncated!r}")
    try:
        return Message(role, content, weight=int(weight), truncated=truncated)
    except MessageError as e:
        raise MessageError(f"{where}: {e}") from None


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
