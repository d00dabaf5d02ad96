"""The strict JSONL reader of eval files: one JSON object per line, every error naming file:line.

    for line, record in iter_jsonl("question.jsonl"):
        ...

Question sets, answers and judgments are read with it by the eval stages (`ds_vicuna.eval.records`) and by the
contamination check (`ds_vicuna.data.overlap`); it lives in the data stage so both can import it.
"""
from __future__ import annotations

import json
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
            raise RecordError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict):
            raise RecordError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        yield number, record
