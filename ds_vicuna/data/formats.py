"""Conversation files in, conversation files out: ShareGPT or OpenAI chat records, JSON list or JSONL, streamed.

    from ds_vicuna.data.formats import iter_conversations, load_conversations, write_conversations
    for conv in iter_conversations("sharegpt.json"):                   # one record in memory at a time
        ...
    convs = load_conversations("raw.jsonl", skip_bad=True, skips=c)    # a list; bad records skipped, counted in c

Accepted records (the file is a JSON list when its first non-space character is `[`, else JSONL):
- ShareGPT: `{"id": ..., "conversations": [{"from": "human"|"gpt"|"system"|..., "value": str}, ...]}`
- OpenAI:   `{"messages": [{"role": "user"|"assistant"|"system"|"developer", "content": str | parts}, ...]}`
  `content` may be a list of parts: text parts (`{"type": "text", "text": ...}`, and `refusal` parts) are joined
  with a newline; any other part (image, audio, file) makes the record a `non_text_content` bad record.
  `developer` is the system message under its newer name. An assistant message may carry `"weight": 0`: it
  stays in the context and nothing of it is trained on.
- Tool use (a `tool`/`function` message, an assistant message with `tool_calls`/`function_call`, ShareGPT
  `function_call`/`observation` turns) is a `tool_use` bad record: ds-vicuna trains on text chats only.

Every record becomes a `Conversation(id, messages)` of `ds_vicuna.chat.messages.Message`. Only the *format* is
checked here (JSON, fields, roles, types, unique ids); the conversation's *structure* (role order, empty turns)
is the cleaning stage's job. Two records with the same `id` are an error naming both (with `skip_bad`, the later
one is skipped and counted as `duplicate_id`, as FastChat's cleaner drops it), because every later stage names
its output after the id; ids are remembered as 64-bit hashes (see `ds_vicuna.data.parallel.HashSet`). Files are
read lazily, JSON lists included, so memory does not grow with the file.
The canonical on-disk form this package writes is ShareGPT JSONL (a turn carries `weight`/`truncated` only
when they are not the default).
"""
from __future__ import annotations

import codecs
import enum
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from ds_vicuna.chat.messages import (ROLE_ALIASES, ContentPartError, Message, MessageError, Role, join_content_parts,
                                to_message)
from ds_vicuna.data.parallel import HashSet, hash64

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
    **{alias: Role(role) for alias, role in ROLE_ALIASES.items()},  # `developer` is the system message
}
TOOL_ROLES = ("tool", "function", "function_call", "observation", "ipython")
WRITE_ROLES = {Role.SYSTEM: "system", Role.USER: "human", Role.ASSISTANT: "gpt"}
_READ_BLOCK = 1 << 20
_MAX_RECORD_CHARS = 1 << 28  # one record of a JSON list is never read past this


class BadRecord(str, enum.Enum):
    """Why a record could not be read; the key under which `skip_bad=True` counts it."""

    EMPTY_FILE = "empty_file"
    MALFORMED_JSON = "malformed_json"
    NOT_AN_OBJECT = "not_an_object"
    MISSING_FIELD = "missing_field"
    UNKNOWN_ROLE = "unknown_role"
    NON_STRING = "non_string"
    NON_TEXT_CONTENT = "non_text_content"  # an image, audio or file content part
    TOOL_USE = "tool_use"  # tool calls or tool results
    BAD_WEIGHT = "bad_weight"  # `weight` not 0/1, `truncated` not a boolean, or either on a non-assistant turn
    DUPLICATE_ID = "duplicate_id"  # an id an earlier record of the file already has


class FormatError(ValueError):
    """A file or record that is not a readable conversation; the message names file, line/record and field."""

    def __init__(self, message: str, reason: BadRecord):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # picklable, so it crosses process boundaries intact
        return type(self), (str(self), self.reason)


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


class _ListStream:
    """The elements of a JSON list, decoded one at a time from a text buffer that is refilled as needed."""

    def __init__(self, path: Path, f, counter: list[int]):
        self.path, self.f, self.counter = path, f, counter
        self.decoder = json.JSONDecoder()
        self.reader = codecs.getincrementaldecoder("utf-8-sig")()
        self.buf, self.pos, self.eof = "", 0, False
        self.dropped_lines, self.dropped_chars = 0, 0  # of text already discarded from the buffer
        self.line_offset = 0  # characters of the current line already discarded

    def _more(self, at_least: int | None = None) -> bool:
        """Append `at_least` (default `_READ_BLOCK`) more bytes of input to the buffer; False at the end of the file."""
        if self.eof:
            return False
        at_least = at_least or _READ_BLOCK
        if self.pos > _READ_BLOCK:  # drop what is consumed, keeping the line count for error positions
            self.dropped_lines += self.buf.count("\n", 0, self.pos)
            self.dropped_chars += self.pos
            last_newline = self.buf.rfind("\n", 0, self.pos)  # and the dropped part of the current line
            self.line_offset = self.pos - last_newline - 1 if last_newline >= 0 else self.line_offset + self.pos
            self.buf, self.pos = self.buf[self.pos:], 0
        block = self.f.read(at_least)
        self.counter[0] += len(block)
        self.buf += self.reader.decode(block, final=not block)
        self.eof = not block
        return True

    def _skip_space(self) -> str:
        """The next non-space character (not consumed), or "" at the end of the file."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self._more():
                return ""

    def error(self, pos: int, msg: str) -> FormatError:
        line = self.dropped_lines + self.buf.count("\n", 0, pos) + 1
        newline = self.buf.rfind("\n", 0, pos)
        column = pos - newline if newline >= 0 else self.line_offset + pos + 1  # 1-based, also on a long line
        return FormatError(f"{self.path}:{line}:{column}: malformed JSON (char {self.dropped_chars + pos}): {msg}",
                           BadRecord.MALFORMED_JSON)

    def __iter__(self) -> Iterator[Any]:
        if self._skip_space() != "[":
            raise self.error(self.pos, "expected '['")
        self.pos += 1
        if self._skip_space() == "]":
            self.pos += 1
        else:
            while True:
                yield self._element()
                sep = self._skip_space()
                if sep == "]":
                    self.pos += 1
                    break
                if sep != ",":
                    raise self.error(self.pos, "expected ',' or ']' after a list element")
                self.pos += 1
        if self._skip_space():
            raise self.error(self.pos, "extra data after the list")

    def _element(self) -> Any:
        read = _READ_BLOCK
        while True:
            if not self._skip_space():
                raise self.error(self.pos, "the list is not closed")
            try:
                value, end = self.decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as e:
                # An error at the buffer's end (or an open string) may only mean the element goes on: read more.
                # One far before the end is real, and is reported without reading the rest of the file.
                cut_off = e.pos + 1024 >= len(self.buf) or e.msg.startswith("Unterminated string")
                if cut_off and len(self.buf) - self.pos > _MAX_RECORD_CHARS:
                    raise self.error(self.pos, f"a record longer than {_MAX_RECORD_CHARS} characters, or "
                                               f"malformed: {e.msg}") from None
                if cut_off and self._more(read):
                    read *= 2
                    continue
                raise self.error(e.pos, e.msg) from None
            if end == len(self.buf) and self._more(read):  # a number or literal may go on in the next block
                continue
            self.pos = end
            return value


def _iter_raw(path: Path, counter: list[int]) -> Iterator[tuple[str, int, Any]]:
    """Yield `(location, position, record or FormatError)`; position is the JSONL line or the list index.

    `counter[0]` follows the bytes read so far (for progress bars).
    """
    kind = _is_json_list(path)
    if kind is None:
        yield f"{path}", 0, FormatError(f"{path}: the file is empty (expected a JSON list or JSONL of "
                                        "conversations)", BadRecord.EMPTY_FILE)
        return
    with open(path, "rb") as f:
        if kind:
            try:
                for index, record in enumerate(_ListStream(path, f, counter)):
                    yield f"{path}: record {index}", index, record
            except FormatError as e:
                yield f"{path}", 0, e
            return
        for lineno, raw in enumerate(f, start=1):
            counter[0] += len(raw)
            line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8", errors="replace")
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
    """Yield `(line_or_index, record)` for every JSON record of a JSON-list or JSONL file, lazily.

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
    for _, position, record in _iter_raw(path, [0]):
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


def _content_text(content: Any, where: str) -> str:
    """A string, or OpenAI content parts joined by the API's own rule (`messages.join_content_parts`)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise FormatError(f"{where}: expected a string or a list of content parts, got {type(content).__name__}",
                          BadRecord.NON_STRING)
    try:
        return join_content_parts(content, where)
    except ContentPartError as e:
        raise FormatError(str(e), BadRecord.NON_TEXT_CONTENT if e.non_text else BadRecord.NON_STRING) from None


def _turn_to_message(turn: Any, where: str) -> Message:
    if not isinstance(turn, dict):
        raise FormatError(f"{where}: expected an object, got {type(turn).__name__}", BadRecord.NOT_AN_OBJECT)
    role_key, content_key = ("from", "value") if "from" in turn or "value" in turn else ("role", "content")
    role = _field(turn, (role_key,), where)
    if isinstance(role, str) and role.lower() in TOOL_ROLES:
        tool_field = f"{role_key} {role!r}"
    else:
        tool_field = next((name for name in ("tool_calls", "function_call") if turn.get(name)), None)
    if tool_field is not None:
        raise FormatError(f"{where}.{tool_field}: tool calls and tool results are not supported (ds-vicuna trains "
                          "on text chats; --skip-bad skips such conversations and counts them as tool_use)",
                          BadRecord.TOOL_USE)
    if not isinstance(role, str) or role.lower() not in SHAREGPT_ROLES:
        raise FormatError(f"{where}.{role_key}: unknown role {role!r} (expected one of "
                          f"{', '.join(SHAREGPT_ROLES)})", BadRecord.UNKNOWN_ROLE)
    content = _content_text(_field(turn, (content_key,), where), f"{where}.{content_key}")
    flags = {name: turn[name] for name in ("weight", "truncated") if name in turn}
    try:  # weight/truncated are judged by the one rule the API's messages go through too
        return to_message({"role": SHAREGPT_ROLES[role.lower()].value, "content": content, **flags}, where)
    except MessageError as e:
        raise FormatError(str(e), BadRecord.BAD_WEIGHT) from None


class ConversationReader:
    """The conversations of one ShareGPT/OpenAI JSON-list or JSONL file, read lazily.

    Args:
        path: the file.
        skip_bad: skip (and count) bad records instead of raising on the first one.
        skips: a Counter that receives one count per skipped record, keyed by `BadRecord`.

    Attributes:
        size: the file's size in bytes; `bytes_read`: how far reading has got (for progress bars).

    Raises (while iterating):
        FormatError: the first bad record, naming file, line (JSONL) or record index (JSON list), and field.
    """

    def __init__(self, path: str | os.PathLike, skip_bad: bool = False, skips: Counter | None = None):
        self.path = Path(path)
        self.skip_bad = skip_bad
        self.skips = Counter() if skips is None else skips
        self.size = self.path.stat().st_size
        self._counter = [0]

    @property
    def bytes_read(self) -> int:
        return self._counter[0]

    def __iter__(self) -> Iterator[Conversation]:
        ids = HashSet()
        for where, position, record in _iter_raw(self.path, self._counter):
            try:
                if isinstance(record, FormatError):
                    raise record
                conv = record_to_conversation(record, where, f"{self.path.stem}-{position}")
                if not ids.add(hash64(conv.id)):
                    earlier = None if self.skip_bad else self._first_with_id(conv.id, position)
                    if self.skip_bad or earlier is not None:  # (else: two ids with one hash; both are fine)
                        raise FormatError(f"{where}: duplicate id {conv.id!r}: {earlier or 'an earlier record'} has "
                                          "it too (ids must be unique: later stages name their output after them)",
                                          BadRecord.DUPLICATE_ID)
            except FormatError as e:
                # A broken JSON list cannot be read past the error, so that one is never skippable.
                if not self.skip_bad or (e.reason is BadRecord.MALFORMED_JSON and _is_json_list(self.path)):
                    raise
                self.skips[e.reason] += 1
                continue
            yield conv


    def _first_with_id(self, conv_id: str, before: int) -> str | None:
        """Where the first record with this id is (read again: only when a duplicate stops the run)."""
        for where, position, record in _iter_raw(self.path, [0]):
            if position >= before:
                return None
            if isinstance(record, dict) and str(record.get("id", f"{self.path.stem}-{position}")) == conv_id:
                return where
        return None


def iter_conversations(path: str | os.PathLike, skip_bad: bool = False,
                       skips: Counter | None = None) -> Iterator[Conversation]:
    """The conversations of a file in file order, one at a time (see `ConversationReader`)."""
    return iter(ConversationReader(path, skip_bad, skips))


def load_conversations(path: str | os.PathLike, skip_bad: bool = False,
                       skips: Counter | None = None) -> list[Conversation]:
    """Read every conversation of a ShareGPT/OpenAI JSON-list or JSONL file into a list.

    Args:
        path: the file.
        skip_bad: skip (and count) bad records instead of raising on the first one.
        skips: a Counter that receives one count per skipped record, keyed by `BadRecord`.

    Returns:
        The conversations in file order.

    Raises:
        FormatError: the first bad record, naming file, line (JSONL) or record index (JSON list), and field.
    """
    return list(ConversationReader(path, skip_bad, skips))


def conversation_to_sharegpt(conv: Conversation) -> dict:
    """The canonical ShareGPT record: `{"id", "conversations": [{"from": "human"|"gpt"|"system", "value"}]}`.

    A turn also carries `"weight": 0` or `"truncated": true` when it has them.
    """
    turns = []
    for m in conv.messages:
        turn = {"from": WRITE_ROLES[m.role], "value": m.content}
        if m.weight != 1:
            turn["weight"] = m.weight
        if m.truncated:
            turn["truncated"] = True
        turns.append(turn)
    return {"id": conv.id, "conversations": turns}


def write_conversations(path: str | os.PathLike, convs: Iterable[Conversation]) -> int:
    """Write conversations as ShareGPT JSONL (one record a line, UTF-8), atomically, as they come.

    Returns:
        The number of conversations written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    count = 0
    try:
        with open(partial, "w", encoding="utf-8") as f:
            for conv in convs:
                f.write(json.dumps(conversation_to_sharegpt(conv), ensure_ascii=False) + "\n")
                count += 1
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    return count
