"""Question sets in FastChat's format: one JSON object per line.

    {"question_id": 1, "category": "generic", "turns": ["How can I improve my time management skills?"]}
    {"question_id": 81, "category": "math", "turns": ["...", "..."], "reference": ["...", "..."]}
    {"question_id": 1, "category": "generic", "text": "..."}       # Vicuna's March-2023 single-turn form

`turns` holds one string per user turn (FastChat's MT-bench and Vicuna-bench files); `text` is the older
single-turn form. `reference` (optional, one string per turn; an empty string means "none for this turn", as in
eight of MT-bench's records) holds reference answers. FastChat's judging reads references from a separate
answer file instead (`reference_answer/gpt-4.jsonl`); `with_reference_answers` attaches such a file, and the
bundled `mt_bench` and `vicuna_bench` sets come with FastChat's GPT-4 reference answers attached.

Bundled sets: `vicuna_80` and `mt_bench_mini` (written for ds-vicuna), `mt_bench` and `vicuna_bench`
(FastChat's files, byte for byte; see `eval/data/fastchat/README.md`). The names are resolved by
`ds_vicuna.data.question_sets`, the registry the contamination check (`data overlap`) uses too.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from ds_vicuna.data.question_sets import resolve_question_set
from ds_vicuna.data.jsonl import RecordError, iter_jsonl

VICUNA_CATEGORIES = ("generic", "knowledge", "roleplay", "common-sense", "fermi", "counterfactual", "writing",
                     "coding", "math")


class QuestionError(RecordError):
    """A question record that breaks the format; the message names file:line:field."""


@dataclass(frozen=True)
class Question:
    question_id: int | str
    category: str
    turns: tuple[str, ...]
    reference: tuple[str | None, ...] | None = None
    """One reference answer per turn (None where a turn has none), or None for no references at all."""

    @property
    def multi_turn(self) -> bool:
        return len(self.turns) > 1

    def reference_for(self, turn: int) -> str | None:
        """The reference answer of turn `turn` (1-based), or None."""
        if not self.reference or turn > len(self.reference):
            return None
        return self.reference[turn - 1]


def load_questions(name_or_path: str | Path) -> list[Question]:
    """Load and validate a bundled set or question file (references only from its own `reference` fields).

    Raises:
        QuestionError: a bad or duplicate record, naming file:line:field.
        UnknownQuestionSet (a FileNotFoundError): neither a bundled set nor a file; lists the bundled names.
    """
    path = resolve_question_set(name_or_path).questions
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


def load_question_set(name_or_path: str | Path, reference_answers: str | Path | None = None) -> list[Question]:
    """Questions with reference answers attached: from `reference_answers` if given, else the bundled set's.

    Raises:
        QuestionError, RecordError: a bad question or reference answer record (file:line:field).
    """
    files = resolve_question_set(name_or_path)
    questions = load_questions(files.questions)
    references = reference_answers or files.reference_answers
    return with_reference_answers(questions, references) if references else questions


def with_reference_answers(questions: list[Question], path: str | Path) -> list[Question]:
    """Attach a FastChat reference answer file (`choices[0].turns` per question_id) to the questions it covers.

    A question the file covers takes the file's references (FastChat judges with these, not the question's own
    `reference` field); other questions keep theirs.

    Raises:
        QuestionError: a reference answer with fewer turns than its question.
    """
    from ds_vicuna.eval.answer_files import load_answers

    answers = load_answers(path)
    out = []
    for question in questions:
        answer = answers.get(question.question_id)
        if answer is None:
            out.append(question)
            continue
        if len(answer.turns) < len(question.turns):
            raise QuestionError(f"{path}: question {question.question_id!r}: {len(answer.turns)} reference turns "
                                f"for {len(question.turns)} question turns")
        out.append(replace(question, reference=tuple(t if t.strip() else None for t in
                                                     answer.turns[:len(question.turns)])))
    return out


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
        _check_strings(reference, f"{where}:reference", allow_empty=True)
        if len(reference) != len(turns):
            raise QuestionError(f"{where}:reference: {len(reference)} reference answers for {len(turns)} turns")
        reference = tuple(r if r.strip() else None for r in reference)
        if all(r is None for r in reference):
            reference = None
    return Question(qid, category, tuple(turns), reference)


def _check_strings(values, where: str, allow_empty: bool = False) -> None:
    if not isinstance(values, list) or not values:
        raise QuestionError(f"{where}: expected a non-empty list of strings")
    for i, value in enumerate(values):
        if not isinstance(value, str) or (not allow_empty and not value.strip()):
            raise QuestionError(f"{where}[{i}]: expected a non-empty string, got {value!r}")
