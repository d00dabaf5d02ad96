"""`eval answer`: FastChat answer records (choices[].turns) from an endpoint (fake) and a local checkpoint."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from tests.support.fake_openai_judge import start_server

from ds_vicuna.eval.answer import ApiBackend, fastchat_temperature, run_answers
from ds_vicuna.eval.answer_files import load_answers
from ds_vicuna.eval.judge_client import ChatClient, RetryPolicy
from ds_vicuna.eval.questions import load_questions
from ds_vicuna.data.jsonl import RecordError

ASSETS = Path(__file__).resolve().parents[1] / "assets"


@pytest.fixture(scope="module")
def base_url():
    srv, _ = start_server()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()


def _backend(base_url):
    client = ChatClient(base_url, "fake-model", retry=RetryPolicy(max_attempts=3, base_wait=0.01))
    return ApiBackend(client, max_tokens=32, workers=3)


def test_api_answers_single_and_multi_turn_then_resume(tmp_path, base_url):
    questions = load_questions("vicuna_80")[:5] + load_questions("mt_bench_mini")[:2]
    out = tmp_path / "answers.jsonl"
    stats = run_answers(questions, _backend(base_url), out, "fake-model", chunk_size=3, progress=False)
    assert (stats.written, stats.skipped, stats.failed) == (7, 0, 0)
    records = {r["question_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    single = records[1]  # single-turn questions are written with choices[].turns too (FastChat reads only that)
    assert set(single) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
    assert single["model_id"] == "fake-model" and len(single["choices"][0]["turns"]) == 1
    assert single["choices"][0]["turns"][0].startswith("reply to: " + questions[0].turns[0][:20])
    turns = records[101]["choices"][0]["turns"]
    assert records[101]["choices"][0]["index"] == 0 and len(turns) == 2
    assert turns[0].endswith("(messages=1)") and turns[1].endswith("(messages=3)")  # turn 2 saw turn 1's reply
    again = run_answers(questions, _backend(base_url), out, "fake-model", progress=False)
    assert (again.written, again.skipped) == (0, 7)
    assert set(load_answers(out)) == {q.question_id for q in questions}


def test_torn_last_line_is_cut_and_that_question_redone(tmp_path, base_url):
    questions = load_questions("vicuna_80")[:3]
    out = tmp_path / "answers.jsonl"
    run_answers(questions[:2], _backend(base_url), out, "fake-model", progress=False)
    with open(out, "a") as handle:
        handle.write('{"question_id": 3, "answer_id": "x", "mod')  # a write cut by SIGKILL
    stats = run_answers(questions, _backend(base_url), out, "fake-model", progress=False)
    assert stats.written == 1
    assert sorted(json.loads(line)["question_id"] for line in out.read_text().splitlines()) == [1, 2, 3]


def test_failed_api_answers_are_not_written(tmp_path, base_url):
    bad = tmp_path / "q.jsonl"
    bad.write_text(json.dumps({"question_id": 1, "category": "generic", "text": "fine"}) + "\n"
                   + json.dumps({"question_id": 2, "category": "generic", "text": "down #fake:500x99"}) + "\n")
    out = tmp_path / "a.jsonl"
    stats = run_answers(load_questions(bad), _backend(base_url), out, "m", progress=False)
    assert (stats.written, stats.failed) == (1, 1) and set(load_answers(out)) == {1}


def test_older_text_records_are_still_read(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"question_id": 1, "answer_id": "x", "model_id": "m", "text": "old answer"}) + "\n"
                    + json.dumps({"question_id": 2, "model_id": "m", "choices": [{"index": 0, "turns": ["a", "b"]}]})
                    + "\n")
    answers = load_answers(path)
    assert answers[1].turns == ("old answer",) and answers[2].turns == ("a", "b")


class RecordingBackend:
    """Answers instantly and records the temperature of each generate call."""

    def __init__(self):
        self.temperature, self.calls = 0.0, []

    def generate(self, conversations):
        self.calls.append((self.temperature, len(conversations)))
        return ["ok"] * len(conversations)


def test_fastchat_per_category_temperatures(tmp_path):
    backend = RecordingBackend()
    questions = load_questions("mt_bench")
    stats = run_answers(questions, backend, tmp_path / "a.jsonl", "m", chunk_size=8, progress=False,
                        temperature_of=fastchat_temperature)
    assert stats.written == 80
    # writing/roleplay 0.7, extraction/math/coding/reasoning 0.0, stem/humanities 0.1: 10 questions each,
    # two turns each, chunks never mix temperatures
    per_temperature = {}
    for temperature, n in backend.calls:
        per_temperature[temperature] = per_temperature.get(temperature, 0) + n
    assert per_temperature == {0.0: 80, 0.1: 40, 0.7: 40}


def test_cli_answers_fastchat_question_file_as_is(tmp_path, base_url):
    out = tmp_path / "answers.jsonl"
    done = subprocess.run([sys.executable, "-m", "ds_vicuna.eval.cli", "answer", "--questions",
                           str(ASSETS / "fastchat" / "question.jsonl"), "--base-url", base_url, "--api-model",
                           "fake-model", "--temperature", "fastchat", "--out", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["question_id"] for r in records) == [81, 103, 111, 123, 133]
    assert all(len(r["choices"][0]["turns"]) == 2 for r in records)


def test_bad_answer_record_names_file_line_field(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"question_id": 1, "model_id": "m", "text": "ok"}) + "\n"
                    + json.dumps({"question_id": 2, "model_id": "m", "choices": [{"index": 0}]}) + "\n")
    with pytest.raises(RecordError, match=r"a.jsonl:2:choices"):
        load_answers(path)


@pytest.mark.slow
def test_local_embedded_model_batched_answers_via_cli(tmp_path):
    questions = tmp_path / "q.jsonl"
    rows = load_questions("vicuna_80")[:2] + load_questions("mt_bench_mini")[:1]
    with open(questions, "w") as handle:
        for q in rows:
            record = {"question_id": q.question_id, "category": q.category}
            record.update({"text": q.turns[0]} if len(q.turns) == 1 else {"turns": list(q.turns)})
            handle.write(json.dumps(record) + "\n")
    out = tmp_path / "answers.jsonl"
    cmd = [sys.executable, "-m", "ds_vicuna.eval.cli", "answer", "--questions", str(questions), "--model",
           "embedded", "--out", str(out), "--max-tokens", "8", "--batch-size", "3", "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    answers = load_answers(out)
    assert set(answers) == {q.question_id for q in rows}
    assert {a.model_id for a in answers.values()} == {"smollm2-135m-instruct"}
    for answer in answers.values():
        for turn in answer.turns:
            assert turn.strip() and "<|im_end|>" not in turn and "<|im_start|>" not in turn
    assert len(answers[101].turns) == 2


def test_answer_help_lists_every_bundled_set_and_fastchats_1024_tokens():
    from ds_vicuna.data.question_sets import BUNDLED_SETS

    done = subprocess.run([sys.executable, "-m", "ds_vicuna.eval.cli", "answer", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    assert all(name in text for name in BUNDLED_SETS) and len(BUNDLED_SETS) == 4
    assert "(default 1024, FastChat's gen_model_answer" in text


def test_local_answers_with_an_adapter_equal_the_merged_model(tmp_path):
    """`eval answer --model BASE --adapter PATH` answers as the merged model does (peft's merge, saved plainly)."""
    import shutil

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ds_vicuna.chat.templates import get_template
    from ds_vicuna.eval.answer import LocalBackend
    from tests.support.tiny_llama import make_adapter, make_tiny_model

    base = make_tiny_model(tmp_path / "base")
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.chat_template = get_template("vicuna_v1.1").jinja(tokenizer)  # a base that speaks a chat template
    tokenizer.save_pretrained(base)
    adapter = make_adapter(base, tmp_path / "adapter", 4, "all-linear", seed=3)
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                       adapter).merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (base / name).is_file():
            shutil.copy(base / name, tmp_path / "merged" / name)
    conversations = [[{"role": "user", "content": "alpha beta gamma"}], [{"role": "user", "content": "river"}]]
    with_adapter = LocalBackend(str(base), max_new_tokens=8, device="cpu", adapter=str(adapter)).generate(conversations)
    expected = LocalBackend(str(tmp_path / "merged"), max_new_tokens=8, device="cpu").generate(conversations)
    plain = LocalBackend(str(base), max_new_tokens=8, device="cpu").generate(conversations)
    assert with_adapter == expected != plain
