"""What `ds-vicuna eval run` is asked to do and what it did: endpoints, settings, result (no stage logic here).

    settings = RunSettings("mt_bench", endpoints(["http://h:8000/v1=ours", "http://h:8001/v1=base"], "--models"),
                           parse_endpoint("https://api.openai.com/v1=gpt-4", "--judge"), Path("runs/eval-1"))

`ds_vicuna.eval.run` drives the stages with these; `ds_vicuna.eval.report` writes the outputs from them.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ds_vicuna.eval.judge_client import RetryPolicy

MODES = ("both", "single", "pairwise")


@dataclass(frozen=True)
class Endpoint:
    base_url: str
    model: str


def parse_endpoint(text: str, flag: str) -> Endpoint:
    """`URL=name` -> Endpoint (the last '=' splits, so URLs with query strings work).

    Raises:
        ValueError: no '=', an empty name, or a URL that is not http(s); names the flag.
    """
    url, sep, name = text.rpartition("=")
    if not sep or not name.strip() or not re.match(r"^https?://", url):
        raise ValueError(f"{flag} {text!r}: expected URL=name, e.g. http://127.0.0.1:8000/v1=my-model")
    return Endpoint(url.rstrip("/"), name.strip())


def safe_name(name: str) -> str:
    """A model or judge name as a file name (`/` and other separators become `_`)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


@dataclass
class RunSettings:
    questions: str
    models: list[Endpoint]
    judge: Endpoint
    out_dir: Path
    mode: str = "both"
    reference_answers: str | None = None
    inline_references: bool = False
    """Judge with the questions' own `reference` fields instead of the set's reference answer file."""
    judge_prompts: str | None = None
    """None: FastChat's MT-bench prompts for grades; `default_prompt_set` for pairwise."""
    baseline: str | None = None
    reference: str | None = None
    """Figure 1 reference model; default: the first model."""
    api_key: str | None = None
    workers: int = 4
    max_tokens: int = 1024
    temperature: float | None = None
    """Answer sampling temperature; None: FastChat's per-category temperatures (MT-bench's own)."""
    judge_max_tokens: int = 2048
    timeout: float = 120.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    resamples: int = 1000
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        names = [m.model for m in self.models]
        if len(names) < 2 and self.mode != "single":
            raise ValueError(f"--models: pairwise judging needs two or more models, got {names}")
        if len(set(names)) != len(names) or len({safe_name(n) for n in names}) != len(names):
            raise ValueError(f"--models: model names must be distinct (also as file names), got {names}")
        if self.mode not in MODES:
            raise ValueError(f"--mode: one of {MODES}, got {self.mode!r}")
        for flag, value in (("--baseline", self.baseline), ("--reference", self.reference)):
            if value is not None and value not in names:
                raise ValueError(f"{flag} {value!r} is not one of --models {names}")


@dataclass
class RunResult:
    out_dir: Path
    answers_failed: dict = field(default_factory=dict)
    judgments_failed: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    references: str = ""
    """Where the judge's reference answers came from (`questions.load_for_judging`)."""
    files: list[Path] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not any(self.answers_failed.values()) and not any(self.judgments_failed.values())


def endpoints(values: Sequence[str], flag: str) -> list[Endpoint]:
    """Each `URL=name` of a flag -> Endpoint (see `parse_endpoint`)."""
    return [parse_endpoint(v, flag) for v in values]


def dump(data, path: Path) -> Path:
    """Write `data` as indented JSON (making the folder); return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    return path
