"""Question sets in FastChat's format: one JSON object per line.

    {"question_id": 1, "category": "generic", "text": "How can I improve my time management skills?"}
    {"question_id": 81, "category": "math", "turns": ["...", "..."], "reference": ["...", "..."]}

`text` is a single-turn question (Vicuna's 80); `turns` is an MT-bench-style multi-turn question. `reference`
(optional, one per turn) holds reference answers for reference-guided grading.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ds_vicuna.eval.records import RecordError, iter_jsonl

VICUNA_CATEGORIES = ("generic", "knowledge", "roleplay", "common-sense", "fermi", "counterfactual", "writing",
                     "coding", "math")
BUNDLED_SETS = {"vicuna_80": "vicuna_80.jsonl", "mt_bench_mini": "mt_bench_mini.jsonl"}


class QuestionError(RecordError):
    """A question record that breaks the format; the message names file:line:field."""


@dataclass(frozen=True)
class Question:
    question_id: int | str
    category: str
    turns: tuple[str, ...]
    reference: tuple[str, ...] | None = None

    @property
    def multi_turn(self) -> bool:
        return len(self.turns) > 1


def question_set_path(name_or_path: str | Path) -> Path:
    """A bundled set name (`vicuna_80`, `mt_bench_mini`) -> its packaged file; anything else is a path."""
    if str(name_or_path) in BUNDLED_SETS:
        return Path(str(resources.files("ds_vicuna.eval") / "questions" / BUNDLED_SETS[str(name_or_path)]))
    return Path(name_or_path)


def load_questions(name_or_path: str | Path) -> list[Question]:
    """Load and validate a question file.

    Raises:
        QuestionError: a bad or duplicate record, naming file:line:field.
        FileNotFoundError: no such file.
    """
    path = question_set_path(name_or_path)
    questions, seen = [], {}
    for line, record in iter_jsonl(path):
        question = parse_question(record, f"{path}:{line}")
        if question.question_id in seen:
            raise QuestionError(f"{path}:{line}:question_id: duplicate id {question.question_id!r} "
                                f"(first at line {seen[question.question_id]})")
        seen[question.question_id] = line
        questions.append(question)
    if not questions:
        raise QuestionError(f"{path}: no questions")
    return questions


def parse_question(record: dict, where: str) -> Question:
    """One record -> Question; `where` ("file:line") prefixes every error."""
    qid = record.get("question_id")
    if isinstance(qid, bool) or not isinstance(qid, (int, str)) or qid == "":
        raise QuestionError(f"{where}:question_id: expected an integer or non-empty string, got {qid!r}")
    category = record.get("category")
    if not isinstance(category, str) or not category:
        raise QuestionError(f"{where}:category: expected a non-empty string, got {category!r}")
    if ("text" in record) == ("turns" in record):
        raise QuestionError(f"{where}:text: give exactly one of 'text' (single turn) or 'turns' (multi-turn)")
    if "text" in record:
        if not isinstance(record["text"], str) or not record["text"].strip():
            raise QuestionError(f"{where}:text: expected a non-empty string, got {record['text']!r}")
        turns = [record["text"]]
    else:
        turns = record["turns"]
        _check_strings(turns, f"{where}:turns")
    reference = record.get("reference")
    if reference is not None:
        reference = [reference] if isinstance(reference, str) else reference
        _check_strings(reference, f"{where}:reference")
        if len(reference) != len(turns):
            raise QuestionError(f"{where}:reference: {len(reference)} reference answers for {len(turns)} turns")
    return Question(qid, category, tuple(turns), tuple(reference) if reference is not None else None)


def _check_strings(values, where: str) -> None:
    if not isinstance(values, list) or not values:
        raise QuestionError(f"{where}: expected a non-empty list of strings")
    for i, value in enumerate(values):
        if not isinstance(value, str) or not value.strip():
            raise QuestionError(f"{where}[{i}]: expected a non-empty string, got {value!r}")
