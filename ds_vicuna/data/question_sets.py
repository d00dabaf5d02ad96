"""The bundled eval question sets by name: one registry for `ds-vicuna eval` and the contamination check.

    vicuna_80      Vicuna's 80 single-turn questions (written for ds-vicuna)
    mt_bench_mini  6 MT-bench-style two-turn questions (written for ds-vicuna; quick runs)
    mt_bench       FastChat's MT-bench: 80 two-turn questions, with FastChat's GPT-4 reference answers
    vicuna_bench   FastChat's Vicuna-bench: 80 questions, with FastChat's GPT-4 reference answers

    resolve_question_set("mt_bench")   # QuestionSetFiles("mt_bench", .../question.jsonl, .../gpt-4.jsonl)
    resolve_question_set("q.jsonl")    # QuestionSetFiles("q.jsonl", Path("q.jsonl"), None)

The same name means the same files everywhere: `eval answer|judge|run --questions mt_bench` asks FastChat's 80
questions, and `data overlap --questions mt_bench` / `data clean --drop-overlap mt_bench` check training data
against those 80 questions and their reference answers. The files are package data of the eval stage
(`eval/questions/`, `eval/data/fastchat/`); this module only names them, in the data stage, so the contamination
check finds them without importing the eval stage.
"""
from __future__ import annotations

import importlib.util
import types
from dataclasses import dataclass
from pathlib import Path

_FASTCHAT = ("data", "fastchat")
# name -> (question file, reference answer file or None), relative to the eval stage's package folder
BUNDLED_SETS = types.MappingProxyType({
    "vicuna_80": (("questions", "vicuna_80.jsonl"), None),
    "mt_bench_mini": (("questions", "mt_bench_mini.jsonl"), None),
    "mt_bench": ((*_FASTCHAT, "mt_bench", "question.jsonl"),
                 (*_FASTCHAT, "mt_bench", "reference_answer", "gpt-4.jsonl")),
    "vicuna_bench": ((*_FASTCHAT, "vicuna_bench", "question.jsonl"),
                     (*_FASTCHAT, "vicuna_bench", "reference_answer", "gpt-4.jsonl")),
})


class UnknownQuestionSet(FileNotFoundError):
    """Neither a bundled set name nor an existing file; the message lists the bundled names."""


@dataclass(frozen=True)
class QuestionSetFiles:
    """A question set's files.

    Attributes:
        name: the bundled name, or the file's name.
        questions: the question file (FastChat's format).
        reference_answers: the reference answer file that comes with a bundled set (`choices[0].turns` per
            question_id), or None.
    """

    name: str
    questions: Path
    reference_answers: Path | None = None


def _eval_package_file(parts: tuple[str, ...]) -> Path:
    # find_spec locates the eval stage's folder (installed or editable) without importing the eval stage.
    spec = importlib.util.find_spec("ds_vicuna.eval")
    if spec is None or not spec.submodule_search_locations:
        raise UnknownQuestionSet("the bundled question sets ship with ds_vicuna.eval, which is not installed")
    return Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)


def bundled_set(name: str) -> QuestionSetFiles:
    """The files of a bundled set.

    Raises:
        UnknownQuestionSet: not a bundled name (the message lists them).
    """
    if name not in BUNDLED_SETS:
        raise UnknownQuestionSet(f"{name}: not a bundled question set (bundled: {', '.join(sorted(BUNDLED_SETS))})")
    questions, references = BUNDLED_SETS[name]
    return QuestionSetFiles(name, _eval_package_file(questions),
                            _eval_package_file(references) if references else None)


def resolve_question_set(name_or_path: str | Path) -> QuestionSetFiles:
    """A bundled set name -> its files; an existing file -> itself (without reference answers).

    A bundled name wins over a file of the same name in the working directory.

    Raises:
        UnknownQuestionSet: neither a bundled set nor an existing file (the message lists the bundled names).
    """
    if str(name_or_path) in BUNDLED_SETS:
        return bundled_set(str(name_or_path))
    path = Path(name_or_path)
    if path.is_file():
        return QuestionSetFiles(path.name, path)
    raise UnknownQuestionSet(f"{name_or_path}: no such file, and not a bundled question set "
                             f"(bundled: {', '.join(sorted(BUNDLED_SETS))})")
