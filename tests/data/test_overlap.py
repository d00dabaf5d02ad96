"""ds_vicuna.data.overlap: eval contamination found by shared word n-grams, on bundled sets and FastChat's own files.

tests/assets/fastchat_mt_bench_*.jsonl are lines copied from lm-sys/FastChat (Apache-2.0),
fastchat/llm_judge/data/mt_bench/question.jsonl and reference_answer/gpt-4.jsonl, as a user would pass them."""
import json
from pathlib import Path

import pytest

from ds_vicuna.data.clean import Cleaner, CleanOptions, SkipReason, clean_conversation, clean_file
from ds_vicuna.data.formats import Conversation, load_conversations
from ds_vicuna.chat.messages import Message, Role
from ds_vicuna.data.overlap import OverlapError, build_index, overlap_files, words

ASSETS = Path(__file__).resolve().parents[1] / "assets"
FASTCHAT_QUESTIONS = ASSETS / "fastchat_mt_bench_questions.jsonl"
FASTCHAT_REFERENCE = ASSETS / "fastchat_mt_bench_reference_gpt-4.jsonl"
RACE = ("Imagine you are participating in a race with a group of people. If you have just overtaken the second "
        "person, what's your current position? Where is the person you just overtook?")


def conv(cid, *texts):
    roles = [Role.USER, Role.ASSISTANT] * len(texts)
    return Conversation(cid, [Message(role, text) for role, text in zip(roles, texts)])


def test_words_ignore_case_punctuation_and_markdown():
    assert words("**Explain** how plate-tectonics\n produces _earthquakes_!") == [
        "explain", "how", "plate", "tectonics", "produces", "earthquakes"]


def test_index_holds_fastchat_questions_turns_and_references():
    index = build_index([str(FASTCHAT_QUESTIONS), str(FASTCHAT_REFERENCE)], n=8)
    labels = set(index.texts) | set(index.too_short)
    assert "fastchat_mt_bench_questions.jsonl:101:turns[0]" in labels
    assert "fastchat_mt_bench_questions.jsonl:101:reference[0]" in index.too_short  # "You are in second place."
    assert "fastchat_mt_bench_reference_gpt-4.jsonl:101:choices[0].turns[1]" in labels
    pasted = conv("c", "Puzzle time! " + RACE.upper(), "Second place.")
    found = index.matches(pasted.messages)
    # GPT-4's reference answer repeats the question's words, so it is matched too.
    assert set(found) == {"fastchat_mt_bench_questions.jsonl:101:turns[0]",
                          "fastchat_mt_bench_reference_gpt-4.jsonl:101:choices[0].turns[0]"}
    assert not index.matches(conv("d", "I overtook the second runner in a race.", "Then you are second.").messages)


def test_bundled_sets_are_the_eval_sets_with_their_reference_answers():
    """`mt_bench` is FastChat's 80 questions (what `eval --questions mt_bench` asks) plus its GPT-4 references."""
    index = build_index(["vicuna_80", "mt_bench", "vicuna_bench", "mt_bench_mini"])
    labels = set(index.texts) | set(index.too_short)
    for name in ("vicuna_80", "mt_bench", "vicuna_bench", "mt_bench_mini"):
        assert any(label.startswith(f"{name}:") for label in labels), name
    assert {f"mt_bench:{qid}:turns[0]" for qid in range(81, 161)} <= labels
    assert "mt_bench:101:choices[0].turns[0]" in labels  # reference_answer/gpt-4.jsonl
    assert any(label.startswith("vicuna_bench:") and ":choices[0].turns[0]" in label for label in labels)


def test_unknown_set_is_refused_with_the_bundled_names():
    with pytest.raises(OverlapError, match=r"vicuna_81: no such file, and not a bundled question set \(bundled: "
                                           r"mt_bench, mt_bench_mini, vicuna_80, vicuna_bench\)"):
        build_index(["vicuna_81"])


def test_bad_eval_file_is_named(tmp_path):
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"question_id": 1, "turns": ["fine question with more than eight words in it"]}\n{"x": 1}\n')
    with pytest.raises(OverlapError, match=r"q\.jsonl:2: no text, turns, reference or choices"):
        build_index([str(bad)])
    bad.write_text('{"question_id": 1, "turns": ["fine"]}\n\n{"turns": ["cut\n')
    with pytest.raises(OverlapError, match=r"q\.jsonl:3: not valid JSON"):
        build_index([str(bad)])
    bad.write_text('["a list"]\n')
    with pytest.raises(OverlapError, match=r"q\.jsonl:1: expected a JSON object, got list"):
        build_index([str(bad)])


def test_overlap_report_and_clean_drop(tmp_path):
    data = tmp_path / "train.jsonl"
    records = [{"id": "leak", "conversations": [{"from": "human", "value": RACE}, {"from": "gpt", "value": "2nd"}]},
               {"id": "fine", "conversations": [{"from": "human", "value": "Tell me about races."},
                                                {"from": "gpt", "value": "Races are contests of speed."}]},
               {"id": "answer-leak", "conversations": [
                   {"from": "human", "value": "Riddle?"},
                   {"from": "gpt", "value": "If you have just overtaken the second person, your current position "
                                            "is now second place."}]}]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    sets = [str(FASTCHAT_QUESTIONS), str(FASTCHAT_REFERENCE)]
    index = build_index(sets)
    report = overlap_files([data], index, sets, progress=False)
    assert [hit["id"] for hit in report.hits] == ["leak", "answer-leak"] and report.conversations == 3
    leak = report.hits[0]["eval"]["fastchat_mt_bench_questions.jsonl:101:turns[0]"]
    assert leak["share"] == 1.0 and leak["shared"] == index.texts["fastchat_mt_bench_questions.jsonl:101:turns[0]"]
    assert json.loads(json.dumps(report.as_dict()))["overlapping"] == 2
    cleaned = clean_file(data, tmp_path / "clean.jsonl", workers=1, progress=False, overlap=index)
    assert cleaned.skipped == {SkipReason.EVAL_OVERLAP: 2} and cleaned.kept == 1
    assert [c.id for c in load_conversations(tmp_path / "clean.jsonl")] == ["fine"]
    assert clean_conversation(conv("x", RACE, "2nd"), Cleaner(CleanOptions(), index)) is SkipReason.EVAL_OVERLAP
