"""Judge prompts, built apart from the API call: Vicuna's pairwise reviews and MT-bench's single grades.

Pairwise (Vicuna evaluation): the judge rates Assistant 1 and Assistant 2 from 1 to 10 on helpfulness, relevance,
accuracy and level of detail. General questions: the two scores on the first line, then the explanation.
Coding: the judge reviews the code. Math: the judge solves the problem first, checks each step, and ends with
`Assistant 1: x` / `Assistant 2: y` (reason first, scores last; the parser reads both layouts).
Single (MT-bench): one answer graded 1-10 as `Rating: [[x]]`; math questions with a reference answer are graded
against it (reference-guided). Multi-turn questions are judged per turn, the judge seeing the whole
conversation so far and asked to grade the last assistant reply.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

from ds_vicuna.eval.questions import Question


class JudgeMode(str, enum.Enum):
    PAIRWISE = "pairwise"
    SINGLE = "single"


@dataclass(frozen=True)
class JudgePrompt:
    name: str
    """Which prompt was used (recorded next to each judgment), e.g. "pair-math" or "single-math-ref-multi"."""
    messages: list[dict]


PAIR_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
SINGLE_SYSTEM = "You are a helpful assistant."
REFERENCE_CATEGORIES = frozenset({"math"})

_PAIR_GENERAL = (
    "We would like to request your feedback on the performance of two AI assistants in response to the user "
    "question displayed above.\nPlease rate the helpfulness, relevance, accuracy, level of details of their "
    "responses. Each assistant receives an overall score on a scale of 1 to 10, where a higher score indicates "
    "better overall performance.\nPlease first output a single line containing only two values indicating the "
    "scores for Assistant 1 and 2, respectively. The two scores are separated by a space. In the subsequent line, "
    "please provide a comprehensive explanation of your evaluation, avoiding any potential bias and ensuring that "
    "the order in which the responses were presented does not affect your judgment.")
_PAIR_CODING = (
    "Your task is to evaluate the coding abilities of the above two assistants. They have been asked to implement "
    "a program to solve a given problem. Please review their code submissions, paying close attention to their "
    "problem-solving approach, code structure, readability, and the inclusion of helpful comments.\n\n"
    "Please ensure that the assistants' submissions:\n\n1. Correctly implement the given problem statement.\n"
    "2. Contain accurate and efficient code.\n3. Include clear and concise comments that explain the code's logic "
    "and functionality.\n4. Adhere to proper coding standards and best practices.\n\nOnce you have carefully "
    "reviewed both submissions, you should first output a single line containing only two scores on the scale of "
    "1-10 (1: no code/no sense; 10: perfect) for Assistant 1 and 2, respectively, separated by a space. Then give "
    "detailed feedback on their strengths and weaknesses, with any suggestions for improvement, starting from the "
    "next line.")
_PAIR_MATH = (
    "We would like to request your feedback on the mathematical proficiency of two AI assistants regarding the "
    "given user question displayed above.\nFirst, please solve the problem independently, without referring to "
    "the answers provided by both AI assistants.\nNext, please examine the problem-solving process of each "
    "assistant step-by-step to ensure their correctness, identifying any incorrect steps if present. Your "
    "evaluation should take into account not only the answer but also the problem-solving steps.\nFinally, rate "
    "each assistant on a scale of 1 to 10, where a higher score indicates better overall performance, and end "
    "your review with exactly these two lines:\nAssistant 1: <score>\nAssistant 2: <score>")
_MULTI_TURN_FOCUS = ("The user asked {n} questions in turn; evaluate only the assistants' replies to the last one "
                     "(question {n}), taking the earlier conversation into account.")
_SINGLE_GENERAL = (
    "Please act as an impartial judge and evaluate the quality of the response provided by an AI assistant to the "
    "user question displayed below. Your evaluation should consider factors such as the helpfulness, relevance, "
    "accuracy, depth, creativity, and level of detail of the response. Begin your evaluation by providing a short "
    "explanation. Be as objective as possible. After providing your explanation, you must rate the response on a "
    'scale of 1 to 10 by strictly following this format: "[[rating]]", for example: "Rating: [[5]]".')
_SINGLE_REFERENCE = (
    "Please act as an impartial judge and evaluate the quality of the response provided by an AI assistant to the "
    "user question displayed below. Your evaluation should consider correctness and helpfulness. You will be "
    "given a reference answer and the assistant's answer. Begin your evaluation by comparing the assistant's "
    "answer with the reference answer. Identify and correct any mistakes. Be as objective as possible. After "
    "providing your explanation, you must rate the response on a scale of 1 to 10 by strictly following this "
    'format: "[[rating]]", for example: "Rating: [[5]]".')


def pair_instruction_name(category: str) -> str:
    """Vicuna's category routing: coding and math get their own reviewer instructions."""
    return {"coding": "pair-coding", "math": "pair-math"}.get(category, "pair-general")


def build_pairwise_prompt(question: Question, answer_1: list[str], answer_2: list[str], turn: int) -> JudgePrompt:
    """The review request for turn `turn` (1-based) with `answer_1` shown as Assistant 1.

    Raises:
        ValueError: an answer with fewer turns than `turn`, or a turn the question does not have.
    """
    _check_turn(question, turn, answer_1, answer_2)
    name = pair_instruction_name(question.category)
    instruction = {"pair-coding": _PAIR_CODING, "pair-math": _PAIR_MATH}.get(name, _PAIR_GENERAL)
    parts = []
    if turn == 1:
        parts.append(f"[Question]\n{question.turns[0]}\n")
        for label, answer in (("Assistant 1", answer_1), ("Assistant 2", answer_2)):
            parts.append(f"[The Start of {label}'s Answer]\n{answer[0]}\n\n[The End of {label}'s Answer]\n")
    else:
        for label, answer in (("Assistant 1", answer_1), ("Assistant 2", answer_2)):
            parts.append(_conversation_block(label, question.turns[:turn], answer[:turn]))
        instruction = _MULTI_TURN_FOCUS.format(n=turn) + "\n" + instruction
        name += "-multi"
    reference = _reference(question, turn)
    if reference is not None and name.startswith("pair-math"):
        parts.append(f"[The Start of Reference Answer]\n{reference}\n[The End of Reference Answer]\n")
        name += "-ref"
    parts.append(f"[System]\n{instruction}\n")
    return JudgePrompt(name, [{"role": "system", "content": PAIR_SYSTEM},
                              {"role": "user", "content": "\n".join(parts)}])


def build_single_prompt(question: Question, answer: list[str], turn: int) -> JudgePrompt:
    """The MT-bench grading request for turn `turn` (1-based); math with a reference is reference-guided."""
    _check_turn(question, turn, answer)
    reference = _reference(question, turn) if question.category in REFERENCE_CATEGORIES else None
    name = "single-math-ref" if reference is not None else "single-general"
    instruction = _SINGLE_REFERENCE if reference is not None else _SINGLE_GENERAL
    parts = [f"[Instruction]\n{instruction}\n"]
    if turn == 1:
        parts.append(f"[Question]\n{question.turns[0]}\n")
        if reference is not None:
            parts.append(f"[The Start of Reference Answer]\n{reference}\n[The End of Reference Answer]\n")
        parts.append(f"[The Start of Assistant's Answer]\n{answer[0]}\n[The End of Assistant's Answer]")
    else:
        parts[0] = f"[Instruction]\n{_MULTI_TURN_FOCUS.format(n=turn)}\n{instruction}\n"
        if reference is not None:
            parts.append(f"[The Start of Reference Answer to question {turn}]\n{reference}\n"
                         "[The End of Reference Answer]\n")
        parts.append(_conversation_block("Assistant", question.turns[:turn], answer[:turn]))
        name += "-multi"
    return JudgePrompt(name, [{"role": "system", "content": SINGLE_SYSTEM},
                              {"role": "user", "content": "\n".join(parts)}])


def _conversation_block(label: str, questions: tuple[str, ...], replies: list[str]) -> str:
    lines = [f"<|The Start of {label}'s Conversation with User|>\n"]
    for i, (asked, reply) in enumerate(zip(questions, replies), start=1):
        lines.append(f"### User (question {i}):\n{asked}\n\n### {label}:\n{reply}\n")
    lines.append(f"<|The End of {label}'s Conversation with User|>\n")
    return "\n".join(lines)


def _reference(question: Question, turn: int) -> str | None:
    return question.reference[turn - 1] if question.reference else None


def _check_turn(question: Question, turn: int, *answers: list[str]) -> None:
    if not 1 <= turn <= len(question.turns):
        raise ValueError(f"question {question.question_id}: no turn {turn} (it has {len(question.turns)})")
    for answer in answers:
        if len(answer) < turn:
            raise ValueError(f"question {question.question_id}: an answer has {len(answer)} turns, "
                             f"turn {turn} requested")
