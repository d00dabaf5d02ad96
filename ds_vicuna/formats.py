"""Conversation files in, conversation files out: ShareGPT or OpenAI chat records, JSON list or JSONL.

    from ds_vicuna.formats import load_conversations, write_conversations
    convs = load_conversations("sharegpt.json")                       # raises on the first bad record
    convs = load_conversations("raw.jsonl", skip_bad=True, skips=c)   # skips bad records, counts them in c

Accepted records (the file is a JSON list when its first non-space character is `[`, else JSONL):
- ShareGPT: `{"id": ..., "conversations": [{"from": "human"|"gpt"|"system"|..., "value": str}, ...]}`
- OpenAI:   `{"messages": [{"role": "user"|"assistant"|"system", "content": str}, ...]}`

Every record becomes a `Conversation(id, messages)` of `ds_vicuna.messages.Message`. Only the *format* is
checked here (JSON, fields, roles, types); the conversation's *structure* (role order, empty turns) is the
cleaning stage's job. The canonical on-disk form this package writes is ShareGPT JSONL.
"""
from __future__ import annotations

import enum
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from ds_vicuna.messages import Message, Role

# ShareGPT exports name the speakers after the product that answered; all of them are the assistant.
SHAREGPT_ROLES = {
    "system": Role.SYSTEM,
    "human": Role.USER,
    "user": Role.USER,
    "gpt": Role.ASSISTANT,
    "assistant": Role.ASSISTANT,
    "chatgpt": Role.ASSISTANT,
    "bing": Role.ASSISTANT,
    "bard": Role.ASSISTANT,
}
WRITE_ROLES = {Role.SYSTEM: "system", Role.USER: "human", Role.ASSISTANT: "gpt"}


class BadRecord(str, enum.Enum):
    """Why a record could not be read; the key under which `skip_bad=True` counts it."""

    EMPTY_FILE = "empty_file"
    MALFORMED_JSON = "malformed_json"
    NOT_AN_OBJECT = "not_an_object"
    MISSING_FIELD = "missing_field"
    UNKNOWN_ROLE = "unknown_role"
    NON_STRING = "non_string"


class FormatError(ValueError):
    """A file or record that is not a readable conversation; the message names file, line/record and field."""

    def __init__(self, message: str, reason: BadRecord):
        super().__init__(message)
        self.reason = reason


@dataclass
class Conversation:
    """One conversation in the internal form.

    Attributes:
        id: the record's id (ShareGPT `id`), or `<file stem>-<record position>` when the record has none.
        messages: the turns, in file order.
    """

    id: str
    messages: list[Message]


def _is_json_list(path: Path) -> bool | None:
    """True for a JSON list, False for JSONL, None for a file with nothing but whitespace."""
    with open(path, encoding="utf-8-sig") as f:
        while True:
            chunk = f.read(4096)
            if not chunk:
                return None
            stripped = chunk.lstrip()
            if stripped:
                return stripped[0] == "["


def _iter_raw(path: Path) -> Iterator[tuple[str, int, Any]]:
    """Yield `(location, position, record or FormatError)`; position is the JSONL line or the list index."""
    kind = _is_json_list(path)
    if kind is None:
        yield f"{path}", 0, FormatError(f"{path}: the file is empty (expected a JSON list or JSONL of "
                                        "conversations)", BadRecord.EMPTY_FILE)
        return
    if kind:
        with open(path, encoding="utf-8-sig") as f:
            try:
                records = json.load(f)
            except json.JSONDecodeError as e:
                yield f"{path}", 0, FormatError(f"{path}:{e.lineno}:{e.colno}: malformed JSON (char {e.pos}): "
                                                f"{e.msg}", BadRecord.MALFORMED_JSON)
                return
        for index, record in enumerate(records):
            yield f"{path}: record {index}", index, record
        return
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield where, lineno, json.loads(line)
            except json.JSONDecodeError as e:
                yield where, lineno, FormatError(f"{where}:{e.colno}: malformed JSON: {e.msg}",
                                                 BadRecord.MALFORMED_JSON)


def iter_records(path: str | os.PathLike, *, skip_bad: bool = False,
                 skips: Counter | None = None) -> Iterator[tuple[int, Any]]:
    """Yield `(line_or_index, record)` for every JSON record of a JSON-list or JSONL file.

    Args:
        path: the file; JSON list when its first non-space character is `[`, JSONL otherwise.
        skip_bad: skip unparseable lines (JSONL) and an empty file instead of raising.
        skips: counts skipped records by `BadRecord` when given.

    Yields:
        The 1-based line number (JSONL) or 0-based list index (JSON list), and the parsed record.

    Raises:
        FormatError: malformed JSON (naming file and line, or file, line and column for a JSON list), an
            empty file, or a JSON list that is not a list.
        FileNotFoundError: no such file.
    """
    path = Path(path)
    for _, position, record in _iter_raw(path):
        if isinstance(record, FormatError):
            # A broken JSON list cannot be read past the error, so that one is never skippable.
            if not skip_bad or (record.reason is BadRecord.MALFORMED_JSON and _is_json_list(path)):
                raise record
            if skips is not None:
                skips[record.reason] += 1
            continue
        yield position, record


def _field(record: dict, names: tuple[str, ...], where: str) -> Any:
    for name in names:
        if name in record:
            return record[name]
    raise FormatError(f"{where}: missing field {' or '.join(repr(n) for n in names)}", BadRecord.MISSING_FIELD)


def record_to_conversation(record: Any, where: str, default_id: str) -> Conversation:
    """Normalise one ShareGPT or OpenAI record.

    Args:
        record: the parsed JSON value.
        where: `file:line` or `file: record i`, used in error messages.
        default_id: the id for a record without one.

    Raises:
        FormatError: naming `where` and the offending field (`conversations[2].from` ...).
    """
    if not isinstance(record, dict):
        raise FormatError(f"{where}: expected a JSON object, got {type(record).__name__}", BadRecord.NOT_AN_OBJECT)
    key = "conversations" if "conversations" in record else "messages"
    turns = _field(record, ("conversations", "messages"), where)
    if not isinstance(turns, list):
        raise FormatError(f"{where}: {key}: expected a list, got {type(turns).__name__}", BadRecord.NOT_AN_OBJECT)
    messages = [_turn_to_message(turn, f"{where}: {key}[{i}]") for i, turn in enumerate(turns)]
    raw_id = record.get("id")
    return Conversation(default_id if raw_id is None else str(raw_id), messages)


def _turn_to_message(turn: Any, where: str) -> Message:
    if not isinstance(turn, dict):
        raise FormatError(f"{where}: expected an object, got {type(turn).__name__}", BadRecord.NOT_AN_OBJECT)
    role_key, content_key = ("from", "value") if "from" in turn or "value" in turn else ("role", "content")
    role = _field(turn, (role_key,), where)
    content = _field(turn, (content_key,), where)
    if not isinstance(role, str) or role.lower() not in SHAREGPT_ROLES:
        raise FormatError(f"{where}.{role_key}: unknown role {role!r} (expected one of "
                          f"{', '.join(SHAREGPT_ROLES)})", BadRecord.UNKNOWN_ROLE)
    if not isinstance(content, str):
        raise FormatError(f"{where}.{content_key}: expected a string, got {type(content).__name__}",
                          BadRecord.NON_STRING)
    return Message(SHAREGPT_ROLES[role.lower()], content)


def load_conversations(path: str | os.PathLike, skip_bad: bool = False,
                       skips: Counter | None = None) -> list[Conversation]:
    """Read every conversation of a ShareGPT/OpenAI JSON-list or JSONL file.

    Args:
        path: the file.
        skip_bad: skip (and count) bad records instead of raising on the first one.
        skips: a Counter that receives one count per skipped record, keyed by `BadRecord`.

    Returns:
        The conversations in file order.

    Raises:
        FormatError: the first bad record, naming file, line (JSONL) or record index (JSON list), and field.
    """
    path = Path(path)
    out = []
    for where, position, record in _iter_raw(path):
        try:
            if isinstance(record, FormatError):
                raise record
            out.append(record_to_conversation(record, where, f"{path.stem}-{position}"))
        except FormatError as e:
            if not skip_bad or (e.reason is BadRecord.MALFORMED_JSON and _is_json_list(path)):
                raise
            if skips is not None:
                skips[e.reason] += 1
    return out


def conversation_to_sharegpt(conv: Conversation) -> dict:
    """The canonical ShareGPT record: `{"id", "conversations": [{"from": "human"|"gpt"|"system", "value"}]}`."""
    return {"id": conv.id,
            "conversations": [{"from": WRITE_ROLES[m.role], "value": m.content} for m in conv.messages]}


def write_conversations(path: str | os.PathLike, convs: Iterable[Conversation]) -> int:
    """Write conversations as ShareGPT JSONL (one record a line, UTF-8), atomically.

    Returns:
        The number of conversations written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    count = 0
    with open(partial, "w", encoding="utf-8") as f:
        for conv in convs:
            f.write(json.dumps(conversation_to_sharegpt(conv), ensure_ascii=False) + "\n")
            count += 1
    partial.replace(path)
    return count
