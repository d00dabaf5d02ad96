"""ds_vicuna.data.split with the SmolLM2 tokenizer: every piece fits, starts with the user, repeats the system."""
from collections import Counter

import pytest

from ds_vicuna.data.formats import Conversation, load_conversations, write_conversations
from ds_vicuna.chat.messages import Message, Role
from ds_vicuna.data.split import SplitError, SplitEvent, Splitter, split_file

U, A, S = Role.USER, Role.ASSISTANT, Role.SYSTEM


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from ds_vicuna.model.embedded import embedded_model_path
    from ds_vicuna.chat.templates import add_template_tokens

    tok = AutoTokenizer.from_pretrained(embedded_model_path())
    add_template_tokens(tok, "vicuna_v1.1")
    return tok


def long_conversation(n: int, system: str | None = None, cid: str = "long") -> Conversation:
    turns = [Message(S, system)] if system else []
    for i in range(n):
        turns += [Message(U, f"Question {i}: what is {i} squared?"),
                  Message(A, f"{i} squared is {i * i}. " + "Squaring multiplies a number by itself. " * (i % 4))]
    return Conversation(cid, turns)


@pytest.mark.parametrize("template", ["vicuna_v1.1", "chatml"])
def test_pieces_fit_start_with_user_and_keep_every_exchange(tokenizer, template):
    splitter = Splitter(tokenizer, template, max_length=120)
    conv = long_conversation(12, system="You are a patient maths tutor.")
    events = Counter()
    pieces = splitter.split(conv, events)
    assert len(pieces) > 2 and events[SplitEvent.SPLIT] == 1
    assert [p.id for p in pieces] == [f"long_{k}" for k in range(len(pieces))]
    assert [length for _, length in splitter.split_measured(conv)] == [splitter.length(p.messages) for p in pieces]
    for piece in pieces:
        assert piece.messages[0] == conv.messages[0]  # the system message opens every piece
        assert piece.messages[1].role is U
        assert splitter.length(piece.messages) <= 120
    # Cut at turn boundaries only: the exchanges, in order, are exactly the original ones.
    assert [m for p in pieces for m in p.messages[1:]] == conv.messages[1:]


def test_greedy_packing_fills_each_piece(tokenizer):
    splitter = Splitter(tokenizer, "vicuna_v1.1", max_length=150)
    pieces = splitter.split(long_conversation(10))
    for piece, following in zip(pieces, pieces[1:]):
        # The next exchange would not have fitted into this piece.
        assert splitter.length(piece.messages + following.messages[:2]) > 150


def test_a_short_conversation_is_one_piece(tokenizer):
    conv = Conversation("s", [Message(U, "Who are you?"), Message(A, "I am Vicuna.")])
    events = Counter()
    assert Splitter(tokenizer, "vicuna_v1.1", 2048).split(conv, events) == [Conversation("s_0", conv.messages)]
    assert not events


def test_a_too_long_reply_is_truncated_decodably(tokenizer):
    reply = "Les élèves étudient l'été. 東京は日本の首都です。 " * 40
    conv = Conversation("t", [Message(U, "Tell me a lot."), Message(A, reply), Message(U, "Thanks"),
                              Message(A, "You're welcome!")])
    splitter = Splitter(tokenizer, "vicuna_v1.1", max_length=100)
    events = Counter()
    pieces = splitter.split(conv, events)
    assert events[SplitEvent.TRUNCATED_REPLY] == 1
    cut = pieces[0].messages[1].content
    assert reply.startswith(cut) and len(cut) < len(reply) and "\ufffd" not in cut
    assert 90 <= splitter.length(pieces[0].messages) <= 100  # cut as late as fits
    assert pieces[1].messages == conv.messages[2:]
    # The cut reply is marked, so its stop token is never trained on: the model must not learn to stop mid-word.
    assert pieces[0].messages[1].truncated and not pieces[1].messages[1].truncated
    from ds_vicuna.chat.encoding import IGNORE_INDEX

    encoded = splitter.encoder.encode(pieces[0].messages)
    stop = tokenizer.convert_tokens_to_ids(splitter.encoder.stop_strings()[0])
    assert encoded["input_ids"][-1] == stop and encoded["labels"][-1] == IGNORE_INDEX
    assert encoded["labels"][-2] != IGNORE_INDEX  # the reply's text itself is trained on
    whole = splitter.encoder.encode(pieces[1].messages)
    assert whole["input_ids"][-1] == stop and whole["labels"][-1] == stop


def test_a_truncated_reply_ends_its_piece_and_survives_the_file(tokenizer, tmp_path):
    reply = "Squaring multiplies a number by itself. " * 30
    conv = Conversation("t", [Message(U, "Explain squaring."), Message(A, reply), Message(U, "Thanks"),
                              Message(A, "You're welcome!")])
    source = tmp_path / "in.jsonl"
    write_conversations(source, [conv])
    report = split_file(source, tmp_path / "out.jsonl", tokenizer, "vicuna_v1.1", 120, progress=False, workers=1)
    pieces = load_conversations(tmp_path / "out.jsonl")
    assert report.events[SplitEvent.TRUNCATED_REPLY] == 1
    assert [len(p.messages) for p in pieces] == [2, 2]  # "Thanks" would have fitted after the cut reply
    assert pieces[0].messages[1].truncated and '"truncated": true' in (tmp_path / "out.jsonl").read_text()


def test_split_file_is_the_same_for_any_number_of_workers(tokenizer, tmp_path):
    source = tmp_path / "in.jsonl"
    write_conversations(source, [long_conversation(n, system="Be exact." if n % 3 else None, cid=f"c{n}")
                                 for n in range(1, 40)])
    outputs = []
    for workers in (1, 2, 3):
        report = split_file(source, tmp_path / f"w{workers}.jsonl", tokenizer, "vicuna_v1.1", 150, progress=False,
                            workers=workers)
        outputs.append(((tmp_path / f"w{workers}.jsonl").read_bytes(), report.as_dict()["events"],
                        report.pieces, report.longest_piece))
    assert outputs[0] == outputs[1] == outputs[2]
    assert outputs[0][1]["split"] > 10


def test_an_exchange_whose_question_alone_is_too_long_is_dropped_and_counted(tokenizer):
    conv = Conversation("q", [Message(U, "word " * 300), Message(A, "ok"), Message(U, "Hi"), Message(A, "Hello")])
    events = Counter()
    pieces = Splitter(tokenizer, "vicuna_v1.1", max_length=80).split(conv, events)
    assert events == {SplitEvent.DROPPED_EXCHANGE: 1}
    assert [p.messages for p in pieces] == [conv.messages[2:]]


def test_bad_role_order_names_the_conversation(tokenizer):
    with pytest.raises(SplitError, match=r"conversation 'x'.*messages\[0\]\.role"):
        Splitter(tokenizer, "vicuna_v1.1", 100).split(Conversation("x", [Message(A, "hi")]))


def test_split_file_reports_and_writes(tokenizer, tmp_path):
    source = tmp_path / "in.jsonl"
    write_conversations(source, [long_conversation(8), Conversation("u", [Message(U, "a"), Message(A, "b"),
                                                                            Message(U, "unanswered")])])
    report = split_file(source, tmp_path / "out.jsonl", tokenizer, "vicuna_v1.1", 130, progress=False)
    pieces = load_conversations(tmp_path / "out.jsonl")
    assert report.pieces == len(pieces) and report.conversations == 2
    assert report.events[SplitEvent.DROPPED_UNANSWERED] == 1 and report.longest_piece <= 130
    assert pieces[-1].id == "u_0" and all(p.messages[0].role is U for p in pieces)


def test_token_stats_of_split_pieces(tokenizer, tmp_path):
    from ds_vicuna.data.stats import stats_file

    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_conversations(source, [long_conversation(n, cid=f"long{n}") for n in (1, 3, 12)])
    split_file(source, out, tokenizer, "vicuna_v1.1", 140, progress=False)
    stats = stats_file(out, model="embedded", template="vicuna_v1.1").as_dict()
    splitter = Splitter(tokenizer, "vicuna_v1.1", 140)
    lengths = sorted(splitter.length(c.messages) for c in load_conversations(out))
    assert stats["tokens"]["max"] == lengths[-1] <= 140 and stats["tokens"]["total"] == sum(lengths)
