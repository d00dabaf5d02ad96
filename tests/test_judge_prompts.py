"""Judge prompt building: category routing, answer placement, references, multi-turn focus."""
from ds_vicuna.eval.judge_prompts import build_pairwise_prompt, build_single_prompt
from ds_vicuna.eval.questions import Question
from ds_vicuna.eval.score_parsing import parse_pair_scores

GENERIC = Question(1, "generic", ("How do I focus?",))
CODING = Question(2, "coding", ("Reverse a list in Python.",))
MATH = Question(3, "math", ("2+2?", "times 3?"), reference=("4", "12"))


def _user(prompt):
    assert prompt.messages[0]["role"] == "system" and prompt.messages[1]["role"] == "user"
    return prompt.messages[1]["content"]


def test_pairwise_general_asks_for_first_line_scores():
    prompt = build_pairwise_prompt(GENERIC, ["answer A"], ["answer B"], turn=1)
    text = _user(prompt)
    assert prompt.name == "pair-general"
    assert "[Question]\nHow do I focus?" in text
    assert text.index("answer A") < text.index("[The End of Assistant 1's Answer]") < text.index("answer B")
    assert "helpfulness, relevance, accuracy, level of details" in text
    assert "first output a single line containing only two values" in text


def test_coding_reviews_code_and_math_solves_first_with_reference():
    assert "review their code submissions" in _user(build_pairwise_prompt(CODING, ["a"], ["b"], 1))
    prompt = build_pairwise_prompt(MATH, ["a"], ["b"], 1)
    text = _user(prompt)
    assert prompt.name == "pair-math-ref"
    assert "solve the problem independently" in text and "Assistant 1: <score>" in text
    assert "[The Start of Reference Answer]\n4\n" in text


def test_multi_turn_pairwise_shows_both_conversations_and_focuses_on_last_turn():
    prompt = build_pairwise_prompt(MATH, ["four", "twelve"], ["4", "13"], turn=2)
    text = _user(prompt)
    assert prompt.name == "pair-math-multi-ref"
    assert "evaluate only the assistants' replies to the last one (question 2)" in text
    assert "### User (question 2):\ntimes 3?\n\n### Assistant 1:\ntwelve" in text
    assert "[The Start of Reference Answer]\n12\n" in text


def test_single_grading_and_reference_guided_math():
    general = build_single_prompt(GENERIC, ["my answer"], 1)
    assert general.name == "single-general" and 'Rating: [[5]]' in _user(general)
    math = build_single_prompt(MATH, ["4", "12"], 2)
    assert math.name == "single-math-ref-multi"
    text = _user(math)
    assert "comparing the assistant's answer with the reference answer" in text
    assert "[The Start of Reference Answer to question 2]\n12\n" in text and "### Assistant:\n12" in text


def test_prompt_does_not_look_like_scores_to_the_parser():
    # a judge that echoes the prompt must not yield scores from the instructions themselves
    for prompt in (build_pairwise_prompt(GENERIC, ["x"], ["y"], 1), build_pairwise_prompt(MATH, ["x"], ["y"], 1)):
        assert not parse_pair_scores(_user(prompt)).parsed
