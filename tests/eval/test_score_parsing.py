"""Table-driven tests for the judge score parser: real-looking judge outputs, including garbage."""
import pytest

from ds_vicuna.eval.score_parsing import (BRACKET_PAIR, VERDICT, VICUNA_PAIR, ParseFailure, parse_pair_scores,
                                          parse_pairwise, parse_single_score)

EMPTY, NONE, RANGE = ParseFailure.EMPTY, ParseFailure.NO_SCORES, ParseFailure.OUT_OF_RANGE

PAIR_CASES = [
    # (judge output, expected (score_1, score_2) or a ParseFailure)
    ("8 9\nAssistant 2 gave a more detailed answer.", (8, 9)),
    ("8, 9\nBoth are relevant.", (8, 9)),
    ("8,9", (8, 9)),
    ("8.5 9\nClose call.", (8.5, 9)),
    ("  \n7 6\nThe first is more accurate.", (7, 6)),
    ("10 10\nBoth perfect.", (10, 10)),
    ("(8, 9)\nexplanation", (8, 9)),
    ("[7, 4]", (7, 4)),
    ("**8 9**\nMarkdown bold first line.", (8, 9)),
    ("Scores: 8/10 9/10\nexplanation", (8, 9)),
    ("7 and 9\nexplanation", (7, 9)),
    ("6 vs 8", (6, 8)),
    ("9\t7\ntab separated", (9, 7)),
    ("Let me solve it first: 3x + 5 = 20 so x = 5.\nAssistant 1 got x = 5, Assistant 2 got x = 4.\n"
     "Assistant 1: 9\nAssistant 2: 3", (9, 3)),
    ("First I solve the problem. The answer is 42.\n\nAssistant 1: 8 / Assistant 2: 4", (8, 4)),
    ("Both assistants wrote code.\n**Assistant 1:** 7/10\n**Assistant 2:** 5/10", (7, 5)),
    ("Assistant 1 receives a score of 6 and Assistant 2 receives a score of 9.", (6, 9)),
    ("The review follows.\nAssistant 1's score: 4\nAssistant 2's score: 8.5", (4, 8.5)),
    ("Initial thoughts: Assistant 1: 5, Assistant 2: 5.\nAfter checking step 3 again:\n"
     "Assistant 1: 9\nAssistant 2: 2", (9, 2)),  # the last verdict wins
    ("Assistant 1 scores 7; Assistant 2 scores 8.", (7, 8)),
    ("I solved it: 12.\nBoth erred in step two.\nScores as a tuple:\n(3, 7)", (3, 7)),
    ("8 9 10\nthree numbers then nothing else", NONE),
    ("Assistant 1 is better.", NONE),
    ("I cannot evaluate these answers.", NONE),
    ("As an AI language model, I do not have opinions.\nAssistant 2 was kinder.", NONE),
    ("Assistant 1: 8", NONE),  # only one labelled score
    ("", EMPTY),
    ("   \n  \n", EMPTY),
    (None, EMPTY),
    ("12 15\nout of range", RANGE),
    ("Assistant 1: 11\nAssistant 2: 3", RANGE),
    ("-1 5", NONE),
    ("<|im_end|><|im_start|>assistant", NONE),
    ("The score is 8 for both", NONE),
]


@pytest.mark.parametrize("text,expected", PAIR_CASES)
def test_parse_pair_scores(text, expected):
    result = parse_pair_scores(text)
    if isinstance(expected, ParseFailure):
        assert (result.parsed, result.failure, result.score_1, result.score_2) == (False, expected, None, None)
    else:
        assert result.parsed and result.failure is None
        assert (result.score_1, result.score_2) == expected


SINGLE_CASES = [
    ("The answer is accurate and detailed.\n\nRating: [[7]]", 7),
    ("[[7]]", 7),
    ("[[8.5]]", 8.5),
    ("Rating: [[ 9 ]]", 9),
    ("Explanation ... Rating: [[6/10]]", 6),
    ("Early guess [[3]] then after reflection: Rating: [[5]]", 5),  # last bracketed rating wins
    ("Rating: [4]", 4),
    ("**Rating:** 8/10", 8),
    ("rating = 2", 2),
    ("Rating: [[10]]", 10),
    ("Rating: [[0]]", 0),
    ("Rating: [[11]]", RANGE),
    ("Rating: [[rating]]", NONE),
    ("The response is good.", NONE),
    ("7", NONE),
    ("", EMPTY),
    (None, EMPTY),
]


@pytest.mark.parametrize("text,expected", SINGLE_CASES)
def test_parse_single_score(text, expected):
    result = parse_single_score(text)
    if isinstance(expected, ParseFailure):
        assert (result.parsed, result.failure, result.score) == (False, expected, None)
    else:
        assert result.parsed and result.score == expected and result.failure is None


VERDICT_CASES = [
    ("Assistant A is more helpful.\n\n[[A]]", "A"),
    ("Both are similar. Final verdict: [[C]]", "tie"),
    ("**Verdict: [[B]]**", "B"),
    ('Following the format ("[[A]]" if A is better), my verdict is [[B]].', "B"),  # the last one counts
    ("[[ A ]]", "A"),
    ("I prefer A.", NONE),
    ("[[D]]", NONE),
    ("", EMPTY),
]


@pytest.mark.parametrize("text,expected", VERDICT_CASES)
def test_verdicts(text, expected):
    verdict = parse_pairwise(text, VERDICT)
    if isinstance(expected, ParseFailure):
        assert (verdict.parsed, verdict.failure) == (False, expected)
    else:
        assert (verdict.parsed, verdict.winner, verdict.score_a) == (True, expected, None)


@pytest.mark.parametrize("text,output_format,expected", [
    ("explanation [[8, 9]]", BRACKET_PAIR, ("B", 8, 9)),
    ("explanation [7,7]", BRACKET_PAIR, ("tie", 7, 7)),
    ("[[8.05, 8]]", BRACKET_PAIR, ("tie", 8.05, 8)),  # within FastChat's TIE_DELTA
    ("9 6\nreasons", VICUNA_PAIR, ("A", 9, 6)),
    ("no scores", VICUNA_PAIR, None),
])
def test_score_formats_give_winners(text, output_format, expected):
    verdict = parse_pairwise(text, output_format)
    assert ((verdict.winner, verdict.score_a, verdict.score_b) if verdict.parsed else None) == expected


def test_unknown_output_format_is_an_error():
    with pytest.raises(ValueError, match="no pairwise parser"):
        parse_pairwise("x", "[[rating]]")
