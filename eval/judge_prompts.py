"""Judge prompts: one registry entry per prompt, loaded from FastChat's `judge_prompts.jsonl` format.

    prompts = load_prompt_set("mt_bench")          # FastChat's eight MT-bench prompts, as FastChat ships them
    prompts = load_prompt_set("vicuna")            # the Vicuna post's three GPT-4 review prompts
    prompts = load_prompt_set("my_prompts.jsonl")  # any file in that format
    chosen = prompts.select(JudgeMode.PAIRWISE, question, turn=1)
    messages = chosen.prompt.render(question, [answer_a_turns, answer_b_turns], turn=1)
    verdict = chosen.prompt.parse(judge_text)

A record of the file (`name`, `type`, `system_prompt`, `prompt_template`, `output_format`, optional
`categories`) becomes one `JudgePrompt`: its mode (`type`), whether it judges the second turn (the template
names `{question_2}`), whether it needs reference answers (it names `{ref_answer_1}`), the question categories
it serves and its score parser (`output_format`). Routing follows FastChat's `gen_judgment.py`: turn 1 is judged
with a single-turn prompt, turn 2 of a two-turn question with a multi-turn prompt (which shows the whole
conversation and asks about the second answer); a prompt that uses references serves FastChat's reference
categories (math, reasoning, coding) unless the record lists `categories`; every other question gets the
prompt without categories. A question in a reference category without a reference answer for the judged turns
falls back to the general prompt, and the selection says so (the judge counts and reports these).

Rendering fills the template with FastChat's placeholder names (`question`, `answer`, `answer_a`, `answer_b`,
`question_1`, `answer_a_2`, `ref_answer_1`, ...) by `str.format`, as FastChat does, and sends the system
prompt as the system message. The prompt texts are therefore FastChat's, character for character.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Sequence

from ds_vicuna.eval.questions import Question
from ds_vicuna.data.jsonl import RecordError, iter_jsonl
from ds_vicuna.eval.score_parsing import (PAIRWISE_FORMATS, SINGLE_FORMATS, PairVerdict, SingleScore,
                                          parse_pairwise, parse_single)

REFERENCE_CATEGORIES = frozenset({"math", "reasoning", "coding", "arena-hard-200"})  # FastChat's NEED_REF_CATS
BUNDLED_PROMPT_SETS = {"mt_bench": ("data", "fastchat", "judge_prompts.jsonl"),
                       "vicuna": ("data", "fastchat", "vicuna_judge_prompts.jsonl")}
MULTI_TURN_TURNS = 2  # FastChat's multi-turn templates show exactly two turns


class JudgeMode(str, enum.Enum):
    PAIRWISE = "pairwise"
    SINGLE = "single"


@dataclass(frozen=True)
class JudgePrompt:
    """One judge prompt: everything about it in one place."""

    name: str
    mode: JudgeMode
    multi_turn: bool
    """Judges turn 2 of a two-turn question, seeing both turns."""
    categories: frozenset[str] | None
    """Question categories this prompt serves; None: every category no other prompt claims."""
    uses_reference: bool
    system_prompt: str
    template: str
    output_format: str
    """Selects the score parser (score_parsing.PAIRWISE_FORMATS / SINGLE_FORMATS)."""

    def render(self, question: Question, answers: Sequence[Sequence[str]], turn: int) -> list[dict]:
        """Chat messages for judging `turn` (1-based) of `answers` (one answer's turns for single mode; the
        answers shown as A and B for pairwise mode).

        Raises:
            ValueError: wrong number of answers, an answer or reference missing a turn the template needs.
        """
        needed = MULTI_TURN_TURNS if self.multi_turn else 1
        expected = 2 if self.mode is JudgeMode.PAIRWISE else 1
        if len(answers) != expected:
            raise ValueError(f"{self.name}: {expected} answer(s) needed, got {len(answers)}")
        if turn != needed or len(question.turns) < needed or any(len(a) < needed for a in answers):
            raise ValueError(f"{self.name}: judges turn {needed} of a question with at least {needed} turns; "
                             f"question {question.question_id!r} turn {turn} has {len(question.turns)} turns and "
                             f"answers with {[len(a) for a in answers]}")
        return [{"role": "system", "content": self.system_prompt},
                {"role": "user", "content": self.template.format(**self._fields(question, answers))}]

    def _fields(self, question: Question, answers: Sequence[Sequence[str]]) -> dict:
        fields: dict = {}
        if self.uses_reference:
            for n in range(1, (MULTI_TURN_TURNS if self.multi_turn else 1) + 1):
                reference = question.reference_for(n)
                if reference is None:
                    raise ValueError(f"{self.name}: question {question.question_id!r} has no reference for turn {n}")
                fields[f"ref_answer_{n}"] = reference
        names = ("answer",) if self.mode is JudgeMode.SINGLE else ("answer_a", "answer_b")
        if not self.multi_turn:
            fields["question"] = question.turns[0]
            fields.update({name: answer[0] for name, answer in zip(names, answers)})
            return fields
        for n in (1, 2):
            fields[f"question_{n}"] = question.turns[n - 1]
            fields.update({f"{name}_{n}": answer[n - 1] for name, answer in zip(names, answers)})
        return fields

    def parse(self, text: str | None) -> PairVerdict | SingleScore:
        """The judge's verdict (pairwise, in the order shown) or grade (single)."""
        if self.mode is JudgeMode.PAIRWISE:
            return parse_pairwise(text, self.output_format)
        return parse_single(text, self.output_format)

    def serves(self, category: str) -> bool:
        return self.categories is not None and category in self.categories


@dataclass(frozen=True)
class Selection:
    prompt: JudgePrompt | None
    """None: no prompt in the set judges this turn."""
    missing_reference: bool = False
    """A reference prompt serves the category, but the question lacks a reference: the general one was chosen."""


@dataclass(frozen=True)
class PromptSet:
    name: str
    prompts: tuple[JudgePrompt, ...]

    def select(self, mode: JudgeMode, question: Question, turn: int) -> Selection:
        """The prompt for judging `turn` (1-based) of `question` in `mode` (module docstring: routing)."""
        if turn > MULTI_TURN_TURNS or (turn == MULTI_TURN_TURNS and len(question.turns) != MULTI_TURN_TURNS):
            return Selection(None)
        slot = [p for p in self.prompts if p.mode is mode and p.multi_turn == (turn == MULTI_TURN_TURNS)]
        general = next((p for p in slot if p.categories is None), None)
        special = next((p for p in slot if p.serves(question.category)), None)
        if special is None:
            return Selection(general)
        if special.uses_reference and any(question.reference_for(n) is None for n in range(1, turn + 1)):
            return Selection(general, missing_reference=True)
        return Selection(special)

    def by_name(self, name: str) -> JudgePrompt:
        """Raises KeyError naming the set's prompts."""
        for prompt in self.prompts:
            if prompt.name == name:
                return prompt
        raise KeyError(f"judge prompt {name!r} is not in {self.name} ({[p.name for p in self.prompts]})")


def prompt_set_path(name_or_path: str | Path) -> Path:
    """A bundled set name (`mt_bench`, `vicuna`) -> its packaged file; anything else is a path."""
    if str(name_or_path) in BUNDLED_PROMPT_SETS:
        return Path(str(resources.files("ds_vicuna.eval").joinpath(*BUNDLED_PROMPT_SETS[str(name_or_path)])))
    return Path(name_or_path)


def load_prompt_set(name_or_path: str | Path) -> PromptSet:
    """Load a judge prompt file in FastChat's `judge_prompts.jsonl` format.

    Raises:
        RecordError: a bad record (file:line:field), a duplicate name, or two prompts competing for the same
            mode, turn and category.
    """
    path = prompt_set_path(name_or_path)
    prompts: list[JudgePrompt] = []
    for line, record in iter_jsonl(path):
        prompt = parse_prompt(record, f"{path}:{line}")
        for other in prompts:
            if other.name == prompt.name:
                raise RecordError(f"{path}:{line}:name: duplicate judge prompt {prompt.name!r}")
            if (other.mode, other.multi_turn) == (prompt.mode, prompt.multi_turn) and _overlap(other, prompt):
                raise RecordError(f"{path}:{line}: judge prompts {other.name!r} and {prompt.name!r} both serve "
                                  f"{prompt.mode.value} {'turn 2' if prompt.multi_turn else 'turn 1'} of the same "
                                  "categories; keep one of them in the file")
        prompts.append(prompt)
    if not prompts:
        raise RecordError(f"{path}: no judge prompts")
    return PromptSet(str(name_or_path), tuple(prompts))


def _overlap(a: JudgePrompt, b: JudgePrompt) -> bool:
    if a.categories is None or b.categories is None:
        return a.categories is None and b.categories is None
    return bool(a.categories & b.categories)


def parse_prompt(record: dict, where: str) -> JudgePrompt:
    """One `judge_prompts.jsonl` record -> JudgePrompt; `where` ("file:line") prefixes every error."""
    for field in ("name", "type", "system_prompt", "prompt_template", "output_format"):
        if not isinstance(record.get(field), str) or (field != "system_prompt" and not record[field]):
            raise RecordError(f"{where}:{field}: expected a string, got {record.get(field)!r}")
    try:
        mode = JudgeMode(record["type"])
    except ValueError:
        raise RecordError(f"{where}:type: expected 'pairwise' or 'single', got {record['type']!r}") from None
    known = PAIRWISE_FORMATS if mode is JudgeMode.PAIRWISE else SINGLE_FORMATS
    if record["output_format"] not in known:
        raise RecordError(f"{where}:output_format: {record['output_format']!r} is not a {mode.value} format "
                          f"this parser reads ({', '.join(known)})")
    template = record["prompt_template"]
    uses_reference = "{ref_answer_1}" in template
    categories = record.get("categories")
    if categories is not None:
        if not isinstance(categories, list) or not all(isinstance(c, str) and c for c in categories):
            raise RecordError(f"{where}:categories: expected a list of category names")
        categories = frozenset(categories)
    elif uses_reference:
        categories = REFERENCE_CATEGORIES
    return JudgePrompt(record["name"], mode, "{question_2}" in template, categories, uses_reference,
                       record["system_prompt"], template, record["output_format"])


def default_prompt_set(mode: JudgeMode, questions: Sequence[Question]) -> str:
    """`vicuna` (scores, Vicuna's Table 2) for pairwise judging of single-turn questions; `mt_bench` otherwise."""
    if mode is JudgeMode.PAIRWISE and all(len(q.turns) == 1 for q in questions):
        return "vicuna"
    return "mt_bench"
