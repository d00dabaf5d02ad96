"""Question sets: bundled files (ours and FastChat's) load; FastChat's format as is; bad records name file:line."""
import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest

from ds_vicuna.data.question_sets import UnknownQuestionSet, resolve_question_set
from ds_vicuna.eval.questions import VICUNA_CATEGORIES, QuestionError, load_question_set, load_questions


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


FASTCHAT = Path(__file__).resolve().parents[1] / "assets" / "fastchat"


def test_fastchat_mt_bench_format_with_empty_references_loads_as_is():
    # FastChat's MT-bench question.jsonl has `turns`, optional `reference` with empty strings ("" = none)
    questions = {q.question_id: q for q in load_questions(FASTCHAT / "question.jsonl")}
    assert questions[103].reference == ("Bo is the shortest.", None)
    assert questions[133].reference == (None, '["red", "blue"]')
    assert questions[123].reference is None and questions[81].turns[1].startswith("Rewrite")


def test_reference_answer_file_replaces_question_references():
    questions = load_question_set(FASTCHAT / "question.jsonl", FASTCHAT / "reference_answer_gpt-4.jsonl")
    by_id = {q.question_id: q for q in questions}
    assert by_id[103].reference_for(2) == "Yes: Tom is taller than Ann, who is taller than Bo."
    assert by_id[123].reference_for(1).startswith("def reverse")
    assert by_id[133].reference is None  # not in the file: inline references only with --inline-references
    assert by_id[81].reference is None


def test_mt_bench_questions_given_as_a_file_are_judged_with_fastchats_references(tmp_path):
    """FastChat's own question.jsonl given as a file is recognised by id and text: its references are FastChat's
    gpt-4.jsonl, as FastChat judges, not the short inline `reference` fields FastChat never reads."""
    import shutil

    from ds_vicuna.eval.questions import load_for_judging

    given = tmp_path / "question.jsonl"
    shutil.copy(resolve_question_set("mt_bench").questions, given)
    bundled = {q.question_id: q for q in load_question_set("mt_bench")}
    raw = {q.question_id: q for q in load_questions(given)}
    questions, note = load_for_judging(given)
    assert note == (f"references: FastChat's mt_bench reference answers ({given} holds the bundled mt_bench "
                    "questions), as FastChat judges")
    assert [q.reference for q in questions] == [bundled[q.question_id].reference for q in questions]
    differ = [i for i, q in raw.items() if q.reference and q.reference != bundled[i].reference]
    assert len(differ) > 20  # the inline ones are other, shorter texts
    inline, note = load_for_judging(given, inline_references=True)
    assert [q.reference for q in inline] == [raw[q.question_id].reference for q in inline]
    assert "--inline-references; FastChat never reads these" in note
    with pytest.raises(QuestionError, match="not both"):
        load_for_judging(given, FASTCHAT / "reference_answer_gpt-4.jsonl", True)
    # a question whose text differs is not MT-bench's: the file's own references, said so
    records = [json.loads(line) for line in given.read_text().splitlines()]
    records[0]["turns"][0] += " (my version)"
    mine = tmp_path / "mine.jsonl"
    mine.write_text("".join(json.dumps(r) + "\n" for r in records))
    own, note = load_for_judging(mine)
    assert [q.reference for q in own] == [raw[q.question_id].reference for q in own]
    assert note.startswith("references: the questions' own `reference` fields")
    assert load_for_judging("mt_bench")[1] == ("references: FastChat's mt_bench reference answers (bundled set), "
                                               "as FastChat judges")


def test_reference_answer_with_too_few_turns_is_an_error(tmp_path):
    refs = tmp_path / "ref.jsonl"
    refs.write_text(json.dumps({"question_id": 111, "model_id": "gpt-4", "choices": [{"index": 0, "turns": ["84"]}]})
                    + "\n")
    with pytest.raises(QuestionError, match="question 111: 1 reference turns for 2 question turns"):
        load_question_set(FASTCHAT / "question.jsonl", refs)


@pytest.mark.parametrize("name,count,categories", [
    ("mt_bench", 80, {"writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"}),
    ("vicuna_bench", 80, set(VICUNA_CATEGORIES)),
])
def test_bundled_fastchat_sets_with_their_gpt4_references(name, count, categories):
    questions = load_question_set(name)
    assert len(questions) == count and {q.category for q in questions} == categories
    needs = [q for q in questions if q.category in ("math", "reasoning", "coding")]
    assert needs and all(q.reference_for(1) and (len(q.turns) == 1 or q.reference_for(2)) for q in needs)
    if name == "mt_bench":
        assert all(len(q.turns) == 2 for q in questions)
        assert sum(1 for q in load_questions(name) if q.reference and None in q.reference) == 8  # the "" ones


def test_bundled_fastchat_files_are_byte_for_byte_fastchats():
    # sha256 of FastChat's files at commit 0e6d3e4b (eval/data/fastchat/README.md)
    expected = {"mt_bench": "119565adbab82227089cefdb44c8d7e2cf04dc0a0ec233634c82e7d4e2a944f7",
                "vicuna_bench": "c248c5c98ba45bb0c2aadae2f270e643bd32679c6c306a3b2a503ac4254cdaa5"}
    for name, digest in expected.items():
        assert hashlib.sha256(resolve_question_set(name).questions.read_bytes()).hexdigest() == digest


def test_unknown_set_is_refused_with_the_bundled_names():
    with pytest.raises(UnknownQuestionSet, match=r"mt_bench_80: no such file, and not a bundled question set "
                                                 r"\(bundled: mt_bench, mt_bench_mini, vicuna_80, vicuna_bench\)"):
        load_question_set("mt_bench_80")
