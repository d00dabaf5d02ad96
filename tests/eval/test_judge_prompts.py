"""Judge prompt registry: FastChat's eight MT-bench prompts and the Vicuna prompts, rendered exactly; routing."""
import hashlib
import json

import pytest

from ds_vicuna.eval.judge_prompts import (JudgeMode, default_prompt_set, load_prompt_set, parse_prompt,
                                          prompt_set_path)
from ds_vicuna.eval.questions import Question
from ds_vicuna.data.jsonl import RecordError
from ds_vicuna.eval.score_parsing import parse_pair_scores

FASTCHAT_SHA256 = "fd283293406d024f44c174b094ef48031d0687a4682fd3a56b29b138f80281b6"  # commit 0e6d3e4b
EIGHT = ["pair-v2", "pair-v2-multi-turn", "pair-math-v1", "pair-math-v1-multi-turn", "single-v1",
         "single-math-v1", "single-v1-multi-turn", "single-math-v1-multi-turn"]
MATH = Question(111, "math", ("What is 12 times 7?", "Now divide by 4."), reference=("84", "21"))
WRITING = Question(81, "writing", ("Write a postcard.", "Make it rhyme."))
A, B = ("a1 {not a field}", "a2"), ("b1", "b2")


def fastchat_kwargs(record: dict, question: Question, answers) -> dict:
    """The keyword arguments FastChat's common.run_judge_single / run_judge_pair pass to template.format."""
    multi = record["name"].endswith("multi-turn")
    kwargs = {}
    if "{ref_answer_1}" in record["prompt_template"]:
        kwargs["ref_answer_1"] = question.reference[0]
        if multi:
            kwargs["ref_answer_2"] = question.reference[1]
    if record["type"] == "single":
        if multi:
            return {**kwargs, "question_1": question.turns[0], "question_2": question.turns[1],
                    "answer_1": answers[0][0], "answer_2": answers[0][1]}
        return {**kwargs, "question": question.turns[0], "answer": answers[0][0]}
    if multi:
        return {**kwargs, "question_1": question.turns[0], "question_2": question.turns[1],
                "answer_a_1": answers[0][0], "answer_b_1": answers[1][0],
                "answer_a_2": answers[0][1], "answer_b_2": answers[1][1]}
    return {**kwargs, "question": question.turns[0], "answer_a": answers[0][0], "answer_b": answers[1][0]}


def test_bundled_file_is_fastchats_byte_for_byte():
    assert hashlib.sha256(prompt_set_path("mt_bench").read_bytes()).hexdigest() == FASTCHAT_SHA256
    assert [p.name for p in load_prompt_set("mt_bench").prompts] == EIGHT


@pytest.mark.parametrize("name", EIGHT)
def test_each_mt_bench_prompt_renders_as_fastchat_formats_it(name):
    record = next(json.loads(line) for line in prompt_set_path("mt_bench").read_text().splitlines()
                  if json.loads(line)["name"] == name)
    prompt = load_prompt_set("mt_bench").by_name(name)
    answers = [A] if record["type"] == "single" else [A, B]
    turn = 2 if name.endswith("multi-turn") else 1
    messages = prompt.render(MATH, answers, turn)
    assert messages == [{"role": "system", "content": record["system_prompt"]},
                        {"role": "user", "content": record["prompt_template"].format(
                            **fastchat_kwargs(record, MATH, answers))}]


def test_pair_v2_literal_text():
    messages = load_prompt_set("mt_bench").by_name("pair-v2").render(WRITING, [("Dear A",), ("Dear B",)], 1)
    assert messages[1]["content"] == ("[User Question]\nWrite a postcard.\n\n[The Start of Assistant A's Answer]\n"
                                      "Dear A\n[The End of Assistant A's Answer]\n\n[The Start of Assistant B's "
                                      "Answer]\nDear B\n[The End of Assistant B's Answer]")
    assert messages[0]["content"].startswith("Please act as an impartial judge and evaluate the quality of the "
                                             "responses provided by two AI assistants")
    assert messages[0]["content"].endswith('"[[A]]" if assistant A is better, "[[B]]" if assistant B is better, '
                                           'and "[[C]]" for a tie.')


def test_single_math_multi_turn_literal_text():
    messages = load_prompt_set("mt_bench").by_name("single-math-v1-multi-turn").render(MATH, [("84", "22")], 2)
    assert messages[1]["content"] == (
        "<|The Start of Reference Answer|>\n\n### User:\nWhat is 12 times 7?\n\n### Reference answer:\n84\n\n"
        "### User:\nNow divide by 4.\n\n### Reference answer:\n21\n\n<|The End of Reference Answer|>\n\n\n"
        "<|The Start of Assistant A's Conversation with User|>\n\n### User:\nWhat is 12 times 7?\n\n"
        "### Assistant A:\n84\n\n### User:\nNow divide by 4.\n\n### Assistant A:\n22\n\n"
        "<|The End of Assistant A's Conversation with User|>")
    assert messages[0]["content"].endswith('for example: "Rating: [[5]]".\n\n')


def test_vicuna_general_prompt_is_the_march_2023_text():
    prompt = load_prompt_set("vicuna").by_name("vicuna-general-v1")
    text = prompt.render(Question(1, "generic", ("How can I sleep better?",)), [("A.",), ("B.",)], 1)[1]["content"]
    assert text == (
        "[Question]\nHow can I sleep better?\n\n[The Start of Assistant 1's Answer]\nA.\n\n[The End of Assistant 1's "
        "Answer]\n\n[The Start of Assistant 2's Answer]\nB.\n\n[The End of Assistant 2's Answer]\n\n[System]\n"
        "We would like to request your feedback on the performance of two AI assistants in response to the user "
        "question displayed above.\nPlease rate the helpfulness, relevance, accuracy, level of details of their "
        "responses. Each assistant receives an overall score on a scale of 1 to 10, where a higher score indicates "
        "better overall performance.\nPlease first output a single line containing only two values indicating the "
        "scores for Assistant 1 and 2, respectively. The two scores are separated by a space. In the subsequent "
        "line, please provide a comprehensive explanation of your evaluation, avoiding any potential bias and "
        "ensuring that the order in which the responses were presented does not affect your judgment.\n\n")
    assert prompt.render(Question(1, "generic", ("q",)), [("x",), ("y",)], 1)[0]["content"] == \
        "You are a helpful and precise assistant for checking the quality of the answer."
    assert not parse_pair_scores(text).parsed  # a judge echoing the prompt gets no scores from it


REASONING_NO_REF = Question(103, "reasoning", ("Who is shortest?", "Why?"))
CODING_ONE_REF = Question(123, "coding", ("Reverse a string.", "Strip it first."), reference=("s[::-1]", None))


@pytest.mark.parametrize("prompts,mode,question,turn,expected,missing", [
    ("mt_bench", JudgeMode.PAIRWISE, WRITING, 1, "pair-v2", False),
    ("mt_bench", JudgeMode.PAIRWISE, WRITING, 2, "pair-v2-multi-turn", False),
    ("mt_bench", JudgeMode.PAIRWISE, MATH, 1, "pair-math-v1", False),
    ("mt_bench", JudgeMode.PAIRWISE, MATH, 2, "pair-math-v1-multi-turn", False),
    ("mt_bench", JudgeMode.SINGLE, MATH, 2, "single-math-v1-multi-turn", False),
    ("mt_bench", JudgeMode.SINGLE, WRITING, 1, "single-v1", False),
    ("mt_bench", JudgeMode.SINGLE, REASONING_NO_REF, 1, "single-v1", True),  # reference category, no reference
    ("mt_bench", JudgeMode.SINGLE, CODING_ONE_REF, 1, "single-math-v1", False),
    ("mt_bench", JudgeMode.SINGLE, CODING_ONE_REF, 2, "single-v1-multi-turn", True),
    ("vicuna", JudgeMode.PAIRWISE, Question(3, "coding", ("q",)), 1, "vicuna-coding-v1", False),
    ("vicuna", JudgeMode.PAIRWISE, Question(4, "math", ("q",)), 1, "vicuna-math-v1", False),
    ("vicuna", JudgeMode.PAIRWISE, Question(5, "fermi", ("q",)), 1, "vicuna-general-v1", False),
    ("vicuna", JudgeMode.PAIRWISE, WRITING, 2, None, False),  # the Vicuna prompts are single-turn only
    ("vicuna", JudgeMode.SINGLE, WRITING, 1, None, False),
    ("mt_bench", JudgeMode.PAIRWISE, Question(9, "writing", ("a", "b", "c")), 2, None, False),  # 3 turns
])
def test_routing(prompts, mode, question, turn, expected, missing):
    chosen = load_prompt_set(prompts).select(mode, question, turn)
    assert (chosen.prompt.name if chosen.prompt else None, chosen.missing_reference) == (expected, missing)


def test_default_prompt_set():
    assert default_prompt_set(JudgeMode.PAIRWISE, [Question(1, "generic", ("q",))]) == "vicuna"
    assert default_prompt_set(JudgeMode.PAIRWISE, [WRITING]) == "mt_bench"
    assert default_prompt_set(JudgeMode.SINGLE, [Question(1, "generic", ("q",))]) == "mt_bench"


GOOD = {"name": "x", "type": "single", "system_prompt": "s", "prompt_template": "{question} {answer}",
        "output_format": "[[rating]]"}


@pytest.mark.parametrize("change,message", [
    ({"type": "triple"}, "x.jsonl:1:type: expected 'pairwise' or 'single'"),
    ({"output_format": "[[A]]"}, "x.jsonl:1:output_format: '[[A]]' is not a single format"),
    ({"prompt_template": ""}, "x.jsonl:1:prompt_template: expected a string"),
    ({"categories": "math"}, "x.jsonl:1:categories: expected a list"),
])
def test_bad_prompt_records_name_file_line_field(change, message):
    with pytest.raises(RecordError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_prompt({**GOOD, **change}, "x.jsonl:1")


def test_two_prompts_for_one_slot_are_refused(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps({**GOOD, "name": "y"}) + "\n")
    with pytest.raises(RecordError, match="'x' and 'y' both serve single turn 1"):
        load_prompt_set(path)


def test_render_refuses_missing_turns_and_references():
    prompt = load_prompt_set("mt_bench").by_name("pair-math-v1-multi-turn")
    with pytest.raises(ValueError, match="no reference for turn 1"):
        prompt.render(Question(1, "math", ("a", "b")), [A, B], 2)
    with pytest.raises(ValueError, match="answers with \\[1, 2\\]"):
        prompt.render(MATH, [("only one",), B], 2)
