"""JSONL files that join the eval stages: the strict reader (errors name file:line) and an append-only writer.

The reader (`iter_jsonl`, `RecordError`) is `ds_vicuna.data.jsonl`'s, which the contamination check shares.

The writer flushes and fsyncs every record, so a run killed at any point leaves every finished record on
disk and at most one torn last line, which `open_append` cuts off before the resumed run appends.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ds_vicuna.data.jsonl import RecordError, iter_jsonl

__all__ = ["RecordError", "iter_jsonl", "AppendWriter"]


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
