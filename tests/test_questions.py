"""Question sets: the bundled files load and cover Vicuna's categories; bad records name file:line:field."""
import json
from collections import Counter

import pytest

from ds_vicuna.eval.questions import VICUNA_CATEGORIES, QuestionError, load_questions


def test_bundled_vicuna_80():
    questions = load_questions("vicuna_80")
    assert len(questions) == 80 and len({q.question_id for q in questions}) == 80
    counts = Counter(q.category for q in questions)
    assert set(counts) == set(VICUNA_CATEGORIES) and min(counts.values()) >= 3
    assert all(len(q.turns) == 1 and len(q.turns[0]) > 20 for q in questions)
    assert len({q.turns[0] for q in questions}) == 80


def test_bundled_mt_bench_mini_two_turns_with_math_references():
    questions = load_questions("mt_bench_mini")
    assert all(len(q.turns) == 2 for q in questions)
    math = [q for q in questions if q.category == "math"]
    assert math and all(q.reference and len(q.reference) == 2 for q in math)


@pytest.mark.parametrize("record,where", [
    ({"category": "math", "text": "1+1?"}, ":2:question_id"),
    ({"question_id": 2, "text": "hi"}, ":2:category"),
    ({"question_id": 2, "category": "x"}, ":2:text"),
    ({"question_id": 2, "category": "x", "text": "a", "turns": ["a"]}, ":2:text"),
    ({"question_id": 2, "category": "x", "turns": ["a", ""]}, ":2:turns[1]"),
    ({"question_id": 2, "category": "x", "text": 5}, ":2:text: expected a non-empty string"),
    ({"question_id": 2, "category": "x", "turns": ["a", "b"], "reference": ["r"]}, ":2:reference"),
    ({"question_id": 1, "category": "x", "text": "dup"}, ":2:question_id: duplicate"),
])
def test_bad_records_name_file_line_field(tmp_path, record, where):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"question_id": 1, "category": "generic", "text": "ok?"}) + "\n"
                    + json.dumps(record) + "\n")
    with pytest.raises(QuestionError) as err:
        load_questions(path)
    assert f"{path}{where}" in str(err.value)


def test_invalid_json_names_line(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question_id": 1, "category": "g", "text": "ok"}\n{oops\n')
    with pytest.raises(ValueError, match=r"q.jsonl:2: not valid JSON"):
        load_questions(path)
