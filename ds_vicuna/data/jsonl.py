"""JSONL files that join the eval stages: the strict reader (errors name file:line) and an append-only writer.

    for line, record in iter_jsonl("question.jsonl"):
        ...
    with AppendWriter("model_answer/ours.jsonl") as out:
        out.write({"question_id": 1, ...})

Question sets, answers and judgments are read with it by the eval stages and by the contamination check
(`ds_vicuna.data.overlap`); it lives in the data stage so both can import it.

The writer flushes and fsyncs every record, so a run killed at any point leaves every finished record on
disk and at most one torn last line, which `open_append` cuts off before the resumed run appends.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator


class RecordError(ValueError):
    """A JSONL record that cannot be used; the message names file:line and the field."""


def iter_jsonl(path: str | Path, *, allow_torn_tail: bool = False) -> Iterator[tuple[int, dict]]:
    """Yield `(line_number, record)` for each non-blank line of a JSONL file.

    Args:
        path: the file.
        allow_torn_tail: skip a last line without a newline that is not valid JSON (a write cut by a kill).

    Raises:
        RecordError: a line that is not a JSON object, naming file:line.
    """
    path = Path(path)
    with path.open(encoding="utf-8") as handle:
        lines = handle.readlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if allow_torn_tail and number == len(lines) and not line.endswith("\n"):
                return
            raise RecordError(f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict):
            raise RecordError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        yield number, record


class AppendWriter:
    """Appends one JSON record per line, flushed and fsynced per record (use as a context manager)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _cut_torn_tail(self.path)
        self._handle = self.path.open("a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> "AppendWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _cut_torn_tail(path: Path) -> None:
    """Truncate a partial last line (no trailing newline) left by a killed writer."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    keep = data.rfind(b"\n") + 1
    with path.open("r+b") as handle:
        handle.truncate(keep)
