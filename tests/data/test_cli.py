"""`ds-vicuna data clean|split|stats` run as a user runs them, on the bundled sample data set."""
import json
import re
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

from ds_vicuna.data.formats import load_conversations
from ds_vicuna.data.question_sets import resolve_question_set

SAMPLE = Path(resources.files("ds_vicuna") / "data" / "sharegpt_sample.json")
BLOCKED = Path(resources.files("ds_vicuna") / "data" / "blocked_words.txt")
ASSETS = Path(__file__).resolve().parents[1] / "assets"


def cli(*args, check=True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "ds_vicuna.cli", "data", *map(str, args)], capture_output=True,
                            text=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def cleaned(tmp_path_factory):
    """The sample cleaned with 1 and with 2 workers."""
    out = tmp_path_factory.mktemp("clean")
    runs = {}
    for workers in (1, 2):
        runs[workers] = cli("clean", SAMPLE, out / f"w{workers}.jsonl", "--skip-bad", "--workers", workers,
                            "--lang", "en", "--blocked-words", BLOCKED, "--report", out / f"w{workers}.json")
    return out, runs


def test_sample_is_what_the_generator_writes():
    result = subprocess.run([sys.executable, str(ASSETS / "make_sample_data.py"), "--check"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    records = json.loads(SAMPLE.read_text())
    assert 250 <= len(records) <= 400 and SAMPLE.stat().st_size < 1_500_000


def test_clean_counts_every_bad_record_by_reason(cleaned):
    out, runs = cleaned
    report = json.loads((out / "w1.json").read_text())
    assert report["skipped"] == {"missing_field": 1, "unknown_role": 1, "non_string": 1, "empty_turn": 1,
                                 "no_reply": 1, "bad_role_order": 1, "duplicate": 1, "wrong_language": 3,
                                 "blocked_word": 2}
    # Every HTML turn of the sample (its generator writes 166) converted, every "1 / 1" counter (73) removed.
    # and the one turn whose blank lines were trimmed is counted too
    assert report["fixes"] == {"html_converted": 166, "page_counter": 73, "merged_turn": 1,
                               "dropped_leading_assistant": 1, "dropped_trailing_user": 1, "language_not_judged": 2,
                               "whitespace": 1}
    assert report["kept"] + sum(report["skipped"].values()) == report["total"] == len(json.loads(SAMPLE.read_text()))
    table = runs[1].stdout
    for reason, count in report["skipped"].items():
        assert any(line.split() == ["skipped:", reason, str(count)] for line in table.splitlines()), table
    assert f"kept {report['kept']}" in " ".join(table.split())


def test_clean_output_is_the_same_for_any_number_of_workers(cleaned):
    out, runs = cleaned
    assert (out / "w1.jsonl").read_bytes() == (out / "w2.jsonl").read_bytes()
    assert runs[1].stdout.replace("w1.", "w.") == runs[2].stdout.replace("w2.", "w.")


def test_clean_output_is_markdown_and_teaches_the_identity(cleaned):
    out, _ = cleaned
    convs = load_conversations(out / "w1.jsonl")
    text = "\n".join(m.content for c in convs for m in c.messages)
    for artifact in ("<div", "<p>", "<li>", "Copy code", "1 / 1"):
        assert artifact not in text
    assert "```python\n" in text and "```sql\n" in text and "| --- |" in text
    identity = [c for c in convs if any("I am Vicuna, a chat assistant fine-tuned by the ds-vicuna team" in m.content
                                        for m in c.messages)]
    assert len(identity) >= 40


def test_clean_without_skip_bad_names_the_bad_record(tmp_path):
    result = cli("clean", SAMPLE, tmp_path / "o.jsonl", "--workers", "1", check=False)
    assert result.returncode == 2
    assert re.search(r"sharegpt_sample\.json: record \d+: conversations\[1\]\.from: unknown role 'robot'",
                     result.stderr)
    result = cli("clean", ASSETS / "bad_line.jsonl", tmp_path / "o.jsonl", "--workers", "1", check=False)
    assert result.returncode == 2 and "bad_line.jsonl:2:" in result.stderr


def test_split_and_stats_on_the_cleaned_sample(cleaned, tmp_path):
    out, _ = cleaned
    result = cli("split", out / "w1.jsonl", tmp_path / "split.jsonl", "--model", "embedded", "--template",
                 "vicuna_v1.1", "--max-length", "512", "--report", tmp_path / "split.json", "--no-progress")
    report = json.loads((tmp_path / "split.json").read_text())
    assert report["events"]["split"] > 10  # the long tail
    assert report["pieces"] > report["conversations"] and report["longest_piece"] <= 512
    assert "truncated_reply" in result.stdout
    stats = json.loads(cli("stats", tmp_path / "split.jsonl", "--json").stdout)  # token stats: test_stats.py
    assert stats["conversations"] == report["pieces"]
    assert stats["turns"]["user"] == stats["turns"]["assistant"] > stats["conversations"]


def test_stats_of_a_weighted_mix_shows_each_sources_token_share(cleaned, tmp_path):
    out, _ = cleaned
    convs = load_conversations(out / "w1.jsonl")
    identity = tmp_path / "identity.jsonl"
    identity.write_text("".join(json.dumps({"id": f"i{k}", "conversations": [
        {"from": "human", "value": "Who are you?"}, {"from": "gpt", "value": "I am Vicuna."}]}) + "\n"
        for k in range(5)))
    mix = json.loads(cli("stats", out / "w1.jsonl", identity, "--weights", "1", "3", "--model", "embedded",
                         "--json").stdout)
    main, ident = mix["sources"]
    assert main["conversations"] == len(convs) and ident["conversations"] == 5 and ident["weight"] == 3
    expected = 3 * ident["tokens"]["total"] / (3 * ident["tokens"]["total"] + main["tokens"]["total"])
    assert ident["share"] == pytest.approx(expected, abs=1e-4) and main["share"] + ident["share"] == pytest.approx(1)
    config = tmp_path / "mix.yaml"
    config.write_text(f"model:\n  name_or_path: embedded\ndata:\n  train_path:\n    - {out / 'w1.jsonl'}\n"
                      f"    - {{path: {identity}, weight: 3}}\n")
    table = cli("stats", "--config", config).stdout
    assert f"{expected:.1%}  weight 3  {identity}" in table
    bad = cli("stats", out / "w1.jsonl", identity, "--weights", "1", check=False)
    assert bad.returncode == 2 and "1 weights for 2 inputs" in bad.stderr


def test_overlap_command_names_the_leaked_conversation(tmp_path):
    question = json.loads((ASSETS.parent.parent / "eval/questions/vicuna_80.jsonl").read_text().splitlines()[19])
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"id": "leak", "conversations": [{"from": "human", "value": question["text"]},
                                                               {"from": "gpt", "value": "Plates."}]}) + "\n")
    result = cli("overlap", data, "--questions", "vicuna_80", "--questions", "mt_bench", "--report",
                 tmp_path / "o.json", "--no-progress")
    assert "overlap: 1 of 1 training conversations" in result.stdout
    assert f"leak  ({data})  vicuna_80:{question['question_id']}:text" in result.stdout
    assert json.loads((tmp_path / "o.json").read_text())["hits"][0]["id"] == "leak"
    failing = cli("overlap", data, "--questions", "vicuna_80", "--fail-on-overlap", "--no-progress", check=False)
    assert failing.returncode == 3 and "1 training conversation(s) overlap the eval sets" in failing.stderr
    assert cli("overlap", data, "--questions", "mt_bench_mini", "--fail-on-overlap", "--no-progress").returncode == 0
    result = cli("clean", data, tmp_path / "c.jsonl", "--drop-overlap", "vicuna_80", "--no-progress")
    assert any(line.split() == ["skipped:", "eval_overlap", "1"] for line in result.stdout.splitlines())


def test_mt_bench_questions_pasted_into_training_data_are_found_and_dropped(tmp_path):
    """The new user's case: three MT-bench questions copied verbatim from the bundled file into a ShareGPT
    training file. `--questions mt_bench` is the 80 questions `eval --questions mt_bench` asks, so all 3 are found."""
    lines = resolve_question_set("mt_bench").questions.read_text().splitlines()
    pasted = [json.loads(lines[i]) for i in (0, 37, 79)]
    records = [{"id": f"pasted-{q['question_id']}", "conversations": [{"from": "human", "value": q["turns"][0]},
                                                                     {"from": "gpt", "value": "Sure."}]}
               for q in pasted]
    records.append({"id": "mine", "conversations": [{"from": "human", "value": "How do I water tomatoes?"},
                                                    {"from": "gpt", "value": "Deeply, twice a week."}]})
    data = tmp_path / "train.json"
    data.write_text(json.dumps(records))
    result = cli("overlap", data, "--questions", "mt_bench", "--no-progress", "--report", tmp_path / "o.json")
    assert "overlap: 3 of 4 training conversations" in result.stdout
    hits = {hit["id"]: hit["eval"] for hit in json.loads((tmp_path / "o.json").read_text())["hits"]}
    assert set(hits) == {f"pasted-{q['question_id']}" for q in pasted}
    assert all(f"mt_bench:{q['question_id']}:turns[0]" in hits[f"pasted-{q['question_id']}"] for q in pasted)
    result = cli("clean", data, tmp_path / "clean.jsonl", "--drop-overlap", "mt_bench", "--no-progress")
    assert any(line.split() == ["skipped:", "eval_overlap", "3"] for line in result.stdout.splitlines())
    assert [c.id for c in load_conversations(tmp_path / "clean.jsonl")] == ["mine"]


def test_overlap_takes_every_bundled_set_and_names_them_for_an_unknown_one(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"id": "a", "conversations": [{"from": "human", "value": "Hi"},
                                                            {"from": "gpt", "value": "Hello."}]}) + "\n")
    result = cli("overlap", data, "--questions", "vicuna_bench", "--no-progress")
    assert "overlap: 0 of 1 training conversations" in result.stdout and "vicuna_bench" in result.stdout
    bad = cli("overlap", data, "--questions", "mt_bench_80", "--no-progress", check=False)
    assert bad.returncode == 2
    assert "mt_bench_80: no such file, and not a bundled question set (bundled: mt_bench, mt_bench_mini, " \
           "vicuna_80, vicuna_bench)" in bad.stderr


def test_split_refuses_a_max_length_beyond_the_models_positions(tmp_path):
    from tests.support.tiny_llama import make_tiny_model, write_conversations

    model = make_tiny_model(tmp_path / "tiny")
    data = write_conversations(tmp_path / "in.jsonl", n=2)
    result = cli("split", data, tmp_path / "out.jsonl", "--model", model, "--max-length", "1024", check=False)
    assert result.returncode != 0
    assert "--max-length 1024 is more than the 512 positions of model" in result.stderr
    ok = cli("split", data, tmp_path / "out.jsonl", "--model", model, "--template", "auto", "--max-length", "512",
             "--no-progress")
    assert "template auto: the tokenizer has no chat template, so vicuna_v1.1" in ok.stderr
