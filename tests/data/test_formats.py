"""ds_vicuna.data.formats: ShareGPT/OpenAI JSON(L) in, ShareGPT JSONL out, every bad record named or counted."""
import json
from collections import Counter
from pathlib import Path

import pytest

from ds_vicuna.data.formats import (BadRecord, Conversation, FormatError, conversation_to_sharegpt, iter_records,
                               load_conversations, write_conversations)
from ds_vicuna.chat.messages import Message, Role

ASSETS = Path(__file__).resolve().parents[1] / "assets"


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_sharegpt_json_list_normalises_every_speaker_name(tmp_path):
    records = [{"id": "x1", "conversations": [{"from": "system", "value": "Be brief."},
                                              {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
                                              {"from": "user", "value": "And?"}, {"from": "chatgpt", "value": "A"},
                                              {"from": "human", "value": "B?"}, {"from": "bing", "value": "B"},
                                              {"from": "human", "value": "C?"}, {"from": "bard", "value": "C"}]}]
    path = _write(tmp_path / "d.json", "  \n" + json.dumps(records))
    [conv] = load_conversations(path)
    assert conv.id == "x1"
    assert [m.role for m in conv.messages] == [Role.SYSTEM] + [Role.USER, Role.ASSISTANT] * 4
    assert conv.messages[2] == Message(Role.ASSISTANT, "Hello")


def test_openai_jsonl_gets_positional_ids(tmp_path):
    lines = [{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
             {"id": 7, "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}]}]
    path = _write(tmp_path / "chat.jsonl", "\n".join(json.dumps(r) for r in lines) + "\n\n")
    convs = load_conversations(path)
    assert [c.id for c in convs] == ["chat-1", "7"]
    assert convs[0].messages == [Message(Role.USER, "2+2?"), Message(Role.ASSISTANT, "4")]


def test_write_then_load_round_trips_unicode_and_ids(tmp_path):
    convs = [Conversation("é-1", [Message(Role.SYSTEM, "Sé bref."), Message(Role.USER, "¿Qué?\n  x"),
                                  Message(Role.ASSISTANT, "```py\nprint('ü')\n```")])]
    path = tmp_path / "out" / "c.jsonl"
    assert write_conversations(path, convs) == 1
    assert load_conversations(path) == convs
    line = path.read_text(encoding="utf-8").splitlines()[0]
    assert json.loads(line) == conversation_to_sharegpt(convs[0])
    assert json.loads(line)["conversations"][1] == {"from": "human", "value": "¿Qué?\n  x"}
    assert not list(path.parent.glob("*.partial"))


def test_iter_records_yields_lines_and_indexes(tmp_path):
    jsonl = _write(tmp_path / "a.jsonl", '{"a": 1}\n\n{"a": 2}\n')
    assert list(iter_records(jsonl)) == [(1, {"a": 1}), (3, {"a": 2})]
    lst = _write(tmp_path / "a.json", '[{"a": 1}, {"a": 2}]')
    assert list(iter_records(lst)) == [(0, {"a": 1}), (1, {"a": 2})]


def test_malformed_jsonl_line_names_file_and_line():
    with pytest.raises(FormatError, match=r"bad_line\.jsonl:2:\d+: malformed JSON") as err:
        load_conversations(ASSETS / "bad_line.jsonl")
    assert err.value.reason is BadRecord.MALFORMED_JSON
    skips = Counter()
    convs = load_conversations(ASSETS / "bad_line.jsonl", skip_bad=True, skips=skips)
    assert [c.id for c in convs] == ["a", "bad_line-3"]
    assert skips == {BadRecord.MALFORMED_JSON: 1}


def test_malformed_json_list_names_position_and_is_never_skipped(tmp_path):
    path = _write(tmp_path / "broken.json", '[\n  {"id": "a",\n   "conversations": [}\n]')
    for skip_bad in (False, True):
        with pytest.raises(FormatError, match=r"broken\.json:3:\d+: malformed JSON"):
            load_conversations(path, skip_bad=skip_bad)


def test_malformed_json_list_on_one_long_line_names_the_true_column(tmp_path):
    """A one-line JSON list (json.dump without indent) longer than the read block: the error's column counts
    from the start of the line, not from the part of it still in memory."""
    import ds_vicuna.data.formats as formats

    good = {"id": "x", "conversations": [{"from": "human", "value": "hi " * 40}, {"from": "gpt", "value": "ok"}]}
    records = [json.dumps({**good, "id": f"c{i}"}) for i in range(12000)]
    text = "[" + ", ".join(records) + ', {"id": "bad" "conversations": []}]'
    assert len(text) > 2 * formats._READ_BLOCK and "\n" not in text
    path = tmp_path / "one_line.json"
    path.write_text(text)
    column = text.index('"conversations": []') + 1
    with pytest.raises(FormatError, match=rf"one_line.json:1:{column}: malformed JSON .*Expecting ',' delimiter"):
        list(iter_records(path))


@pytest.mark.parametrize("record_id, reason, pattern", [
    (1, BadRecord.UNKNOWN_ROLE, r"record 1: conversations\[1\]\.from: unknown role 'robot'"),
    (2, BadRecord.NON_STRING,
     r"record 2: conversations\[1\]\.value: expected a string or a list of content parts, got int"),
    (3, BadRecord.MISSING_FIELD, r"record 3: conversations\[0\]: missing field 'value'"),
    (4, BadRecord.MISSING_FIELD, r"record 4: missing field 'conversations' or 'messages'"),
    (5, BadRecord.NOT_AN_OBJECT, r"record 5: expected a JSON object, got str"),
])
def test_bad_record_error_names_file_record_and_field(tmp_path, record_id, reason, pattern):
    records = json.loads((ASSETS / "bad_records.json").read_text())
    good = [{**records[0], "id": f"ok{i}"} for i in range(record_id)]
    path = _write(tmp_path / "bad.json", json.dumps(good + [records[record_id]]))
    with pytest.raises(FormatError, match=r"bad\.json: " + pattern) as err:
        load_conversations(path)
    assert err.value.reason is reason


def test_skip_bad_counts_each_reason():
    skips = Counter()
    convs = load_conversations(ASSETS / "bad_records.json", skip_bad=True, skips=skips)
    assert [c.id for c in convs] == ["ok"]
    assert skips == {BadRecord.UNKNOWN_ROLE: 1, BadRecord.NON_STRING: 1, BadRecord.MISSING_FIELD: 2,
                     BadRecord.NOT_AN_OBJECT: 1}


def test_unknown_role_in_jsonl_names_the_line(tmp_path):
    path = _write(tmp_path / "r.jsonl", '{"messages": [{"role": "user", "content": "a"}]}\n'
                                         '{"messages": [{"role": "robot", "content": "b"}]}\n')
    with pytest.raises(FormatError, match=r"r\.jsonl:2: messages\[0\]\.role: unknown role 'robot'"):
        load_conversations(path)


@pytest.mark.parametrize("text", ["", "  \n\n"])
def test_empty_file_is_an_error_or_counted(tmp_path, text):
    path = _write(tmp_path / "empty.jsonl", text)
    with pytest.raises(FormatError, match=r"empty\.jsonl: the file is empty"):
        load_conversations(path)
    skips = Counter()
    assert load_conversations(path, skip_bad=True, skips=skips) == []
    assert skips == {BadRecord.EMPTY_FILE: 1}


# ---- OpenAI format details, duplicate ids, streaming ------------------------------------------------------

def test_openai_content_parts_developer_and_weight(tmp_path):
    record = {"id": "o", "messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "text", "text": "2+2?"}]},
        {"role": "assistant", "content": "5", "weight": 0},
        {"role": "user", "content": "Sure?"},
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "I meant 4."}], "weight": 1}]}
    [conv] = load_conversations(_write(tmp_path / "o.jsonl", json.dumps(record) + "\n"))
    assert conv.messages == [Message(Role.SYSTEM, "Be brief."), Message(Role.USER, "Look:\n2+2?"),
                             Message(Role.ASSISTANT, "5", weight=0), Message(Role.USER, "Sure?"),
                             Message(Role.ASSISTANT, "I meant 4.")]
    # Written back as ShareGPT with the weight kept, and read back the same.
    write_conversations(tmp_path / "back.jsonl", [conv])
    assert json.loads((tmp_path / "back.jsonl").read_text())["conversations"][2] == {"from": "gpt", "value": "5",
                                                                                     "weight": 0}
    assert load_conversations(tmp_path / "back.jsonl") == [conv]


def test_openai_messages_read_as_the_api_reads_them(tmp_path):
    """One rule for content parts and `developer`: a training file and a chat request give the same messages."""
    from ds_vicuna.serve.errors import APIError
    from ds_vicuna.serve.openai_protocol import parse_chat_request

    messages = [{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": [{"type": "refusal", "refusal": "No."}]},
                {"role": "user", "content": "c"}]
    [conv] = load_conversations(_write(tmp_path / "m.jsonl", json.dumps({"id": "m", "messages": messages}) + "\n"))
    assert conv.messages == parse_chat_request({"model": "x", "messages": messages})[1]
    bad = messages[:1] + [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]
    with pytest.raises(FormatError) as data_err:
        load_conversations(_write(tmp_path / "b.jsonl", json.dumps({"id": "b", "messages": bad}) + "\n"))
    with pytest.raises(APIError) as api_err:
        parse_chat_request({"model": "x", "messages": bad})
    part_error = "messages[1].content[0]: content part of type 'input_audio'"
    assert part_error in str(data_err.value) and part_error in api_err.value.message
    assert data_err.value.reason is BadRecord.NON_TEXT_CONTENT


@pytest.mark.parametrize("turn, reason, pattern", [
    ({"role": "tool", "tool_call_id": "1", "content": "42"}, BadRecord.TOOL_USE,
     r"messages\[1\]\.role 'tool': tool calls"),
    ({"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}, BadRecord.TOOL_USE,
     r"messages\[1\]\.tool_calls: tool calls and tool results are not supported"),
    ({"from": "function_call", "value": "{}"}, BadRecord.TOOL_USE, r"conversations\[1\]\.from 'function_call'"),
    ({"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
     BadRecord.NON_TEXT_CONTENT, r"messages\[1\]\.content\[0\]: content part of type 'image_url'"),
    ({"role": "assistant", "content": "x", "weight": 0.5}, BadRecord.BAD_WEIGHT,
     r"messages\[1\]\.weight: expected 0 or 1"),
    ({"role": "user", "content": "x", "weight": 0}, BadRecord.BAD_WEIGHT, r"messages\[1\]: weight and truncated apply"),
    ({"role": "assistant", "content": None}, BadRecord.NON_STRING, r"messages\[1\]\.content: expected a string"),
    ({"role": "assistant", "content": [{"type": {"t": 1}, "text": "x"}]}, BadRecord.NON_STRING,
     r"messages\[1\]\.content\[0\]: a content part must be an object with a string 'type'"),
])
def test_openai_records_that_cannot_be_trained_on_are_named_or_counted(tmp_path, turn, reason, pattern):
    key = "conversations" if "from" in turn else "messages"
    first = {"from": "human", "value": "q"} if key == "conversations" else {"role": "user", "content": "q"}
    lines = [{"id": "bad", key: [first, turn]}, {"id": "ok", "messages": [{"role": "user", "content": "q"}]}]
    path = _write(tmp_path / "t.jsonl", "".join(json.dumps(r) + "\n" for r in lines))
    with pytest.raises(FormatError, match=r"t\.jsonl:1: " + pattern) as err:
        load_conversations(path)
    assert err.value.reason is reason
    skips = Counter()
    assert [c.id for c in load_conversations(path, skip_bad=True, skips=skips)] == ["ok"]
    assert skips == {reason: 1}


def test_duplicate_ids_name_both_records_or_are_counted(tmp_path):
    lines = [{"id": "dup_a", "conversations": [{"from": "human", "value": "one"}]},
             {"id": "b", "conversations": [{"from": "human", "value": "two"}]},
             {"id": "dup_a", "conversations": [{"from": "human", "value": "three"}]}]
    jsonl = _write(tmp_path / "d.jsonl", "".join(json.dumps(r) + "\n" for r in lines))
    with pytest.raises(FormatError, match=r"d\.jsonl:3: duplicate id 'dup_a': .*d\.jsonl:1 has it too") as err:
        load_conversations(jsonl)
    assert err.value.reason is BadRecord.DUPLICATE_ID
    as_list = _write(tmp_path / "d.json", json.dumps(lines))
    with pytest.raises(FormatError, match=r"d\.json: record 2: duplicate id 'dup_a': .*d\.json: record 0 has it"):
        load_conversations(as_list)
    skips = Counter()
    convs = load_conversations(as_list, skip_bad=True, skips=skips)
    assert [c.messages[0].content for c in convs] == ["one", "two"] and skips == {BadRecord.DUPLICATE_ID: 1}


def test_json_list_is_streamed_across_read_blocks(tmp_path, monkeypatch):
    import ds_vicuna.data.formats as formats

    monkeypatch.setattr(formats, "_READ_BLOCK", 7)  # every record spans several blocks
    records = [{"id": f"r{i}", "conversations": [{"from": "human", "value": "é" * i + "\n" + "x" * (3 * i)},
                                                  {"from": "gpt", "value": str(i)}]} for i in range(40)]
    path = _write(tmp_path / "s.json", "\ufeff[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in records)
                  + "\n]\n")
    reader = formats.ConversationReader(path)
    convs = list(reader)
    assert [c.id for c in convs] == [r["id"] for r in records]
    assert convs[39].messages[0].content == "é" * 39 + "\n" + "x" * 117
    assert reader.bytes_read == reader.size
    broken = _write(tmp_path / "b.json", "[\n" + json.dumps(records[0]) + ",\n" + json.dumps(records[1])[:-3] + "\n]")
    with pytest.raises(FormatError, match=r"b\.json:4:1: malformed JSON \(char \d+\): Expecting .,. delimiter"):
        list(formats.ConversationReader(broken))
    for text, message in (("[1, 2] x", "extra data"), ('[{"id": 1} {"id": 2}]', "expected ',' or ']'"),
                          ("[", "not closed")):
        with pytest.raises(FormatError, match=message):
            list(formats.iter_records(_write(tmp_path / "x.json", text)))


def test_hash_set_grows_and_remembers():
    from ds_vicuna.data.parallel import HashSet, hash64

    seen = HashSet(capacity=4)
    keys = [hash64(f"id-{i}") for i in range(5000)] + [0, 2**64 - 1]
    assert all(seen.add(k) for k in keys) and len(seen) == len(keys)
    assert not any(seen.add(k) for k in keys) and all(k in seen for k in keys)
    assert hash64("x") not in seen and hash64("é") == hash64("é") != hash64("e")


def test_a_malformed_json_list_fails_where_it_breaks_without_reading_on(tmp_path, monkeypatch):
    import ds_vicuna.data.formats as formats

    monkeypatch.setattr(formats, "_READ_BLOCK", 64)
    good = json.dumps({"id": "a", "conversations": [{"from": "human", "value": "x" * 100}]})
    path = _write(tmp_path / "m.json", "[\n" + '{"id": "b", "conversations": [}' + ",\n" + ",\n".join([good] * 2000)
                  + "\n]")
    reader = formats.ConversationReader(path)
    with pytest.raises(FormatError, match=r"m\.json:2:\d+: malformed JSON"):
        list(reader)
    assert reader.bytes_read < 5000 < reader.size  # stopped at the error, not at the end of the file
