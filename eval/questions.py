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


def load_question_set(name_or_path: str | Path, reference_answers: str | Path | None = None,
                      inline_references: bool = False) -> list[Question]:
    """Questions with the reference answers judging uses attached (see `load_for_judging`)."""
    return load_for_judging(name_or_path, reference_answers, inline_references)[0]


def load_for_judging(name_or_path: str | Path, reference_answers: str | Path | None = None,
                     inline_references: bool = False) -> tuple[list[Question], str]:
    """Questions with reference answers attached, as FastChat judges them, and a line saying where they came from.

    References come from `reference_answers` when given; else from the set's own reference answer file when the
    questions are a bundled set's (by name, or a file whose questions match the set's by id and text, e.g.
    FastChat's own `mt_bench/question.jsonl`): FastChat always judges with `reference_answer/gpt-4.jsonl` and never
    reads the questions' inline `reference` fields. Those are used only with `inline_references`.

    Raises:
        QuestionError, RecordError: a bad question or reference answer record (file:line:field), or both
            `reference_answers` and `inline_references`.
    """
    files = resolve_question_set(name_or_path)
    questions = load_questions(files.questions)
    if inline_references:
        if reference_answers:
            raise QuestionError("give --reference-answers or --inline-references, not both")
        inline = sum(q.reference is not None for q in questions)
        return questions, (f"references: the questions' own `reference` fields ({inline} questions have them; "
                           "--inline-references; FastChat never reads these)")
    stripped = [replace(q, reference=None) for q in questions]
    if reference_answers:
        return (with_reference_answers(stripped, reference_answers),
                f"references: {reference_answers} (--reference-answers)")
    matched = files if files.reference_answers else matching_bundled_set(questions)
    if matched is not None and matched.reference_answers is not None:
        how = "bundled set" if matched is files else f"{files.questions} holds the bundled {matched.name} questions"
        return (with_reference_answers(stripped, matched.reference_answers),
                f"references: FastChat's {matched.name} reference answers ({how}), as FastChat judges")
    inline = sum(q.reference is not None for q in questions)
    if inline:
        return questions, (f"references: the questions' own `reference` fields ({inline} questions; no reference "
                           "answer file given or known for this set)")
    return questions, "references: none"


def matching_bundled_set(questions: list[Question]):
    """The bundled set with reference answers whose questions include every one of `questions` (same id and
    turn texts), or None."""
    from ds_vicuna.data.question_sets import BUNDLED_SETS, bundled_set

    for name in BUNDLED_SETS:
        files = bundled_set(name)
        if files.reference_answers is None:
            continue
        known = {q.question_id: q.turns for q in load_questions(files.questions)}
        if all(known.get(q.question_id) == q.turns for q in questions):
            return files
    return None


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
