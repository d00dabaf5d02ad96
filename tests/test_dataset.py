"""Tokenized dataset cache: exact contents, cache hits, keys, errors and the multi-rank build."""
import json
import os

import numpy as np
import pytest

from ds_vicuna.dataset import TokenizedDataset, build_tokenized_dataset, cache_key, encode_conversations
from ds_vicuna.encoding import encode_conversation


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from ds_vicuna.models import embedded_model_path

    return AutoTokenizer.from_pretrained(embedded_model_path())


def record(i, words=3):
    return {"id": f"c{i}", "conversations": [{"from": "human", "value": f"question {i} " + "why " * words},
                                             {"from": "gpt", "value": f"answer {i} " + "because " * (i % 7)},
                                             {"from": "human", "value": "thanks"},
                                             {"from": "gpt", "value": "you are welcome"}]}


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def data(tmp_path):
    return write(tmp_path / "convs.jsonl", [record(i) for i in range(20)])


def test_build_matches_encoder_and_hits_cache(tmp_path, data, tokenizer):
    first = build_tokenized_dataset(data, tokenizer, "chatml", 256, cache_dir=tmp_path / "cache", num_workers=1)
    assert not first.from_cache and len(first) == 20
    expected = encode_conversation(
        [{"role": "user", "content": "question 3 why why why "}, {"role": "assistant", "content": "answer 3 " + "because " * 3},
         {"role": "user", "content": "thanks"}, {"role": "assistant", "content": "you are welcome"}],
        tokenizer, "chatml")
    assert first[3]["input_ids"].tolist() == expected["input_ids"]
    assert first[3]["labels"].tolist() == expected["labels"]
    assert first.lengths[3] == len(expected["input_ids"])
    assert first.conversation_ids()[:2] == ["c0", "c1"]
    second = build_tokenized_dataset(data, tokenizer, "chatml", 256, cache_dir=tmp_path / "cache", num_workers=1)
    assert second.from_cache and second.folder == first.folder  # nothing encoded the second time
    assert np.array_equal(second.lengths, first.lengths)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.folder.name]  # no temp folder left
    assert sorted(p.name for p in first.folder.iterdir()) == [
        "conversation_ids.json", "input_ids.npy", "labels.npy", "meta.json", "offsets.npy"]


def test_cache_key_changes_with_every_input(tmp_path, data, tokenizer):
    base = cache_key(data, tokenizer, "chatml", 256)
    assert cache_key(data, tokenizer, "chatml", 256) == base
    other = write(tmp_path / "other.jsonl", [record(i) for i in range(21)])
    variants = [cache_key(data, tokenizer, "vicuna_v1.1", 256), cache_key(data, tokenizer, "chatml", 512),
                cache_key(other, tokenizer, "chatml", 256), cache_key(data, tokenizer, "chatml", 256, mask="all")]
    assert len({base, *variants}) == 5


def test_parallel_equals_serial(tokenizer):
    from ds_vicuna.formats import Conversation
    from ds_vicuna.messages import Message, Role

    convs = [Conversation(f"c{i}", [Message(Role.USER, f"hi {i}"), Message(Role.ASSISTANT, "yo " * i)])
             for i in range(1, 150)]
    serial = encode_conversations(convs, tokenizer, "vicuna_v1.1", num_workers=1, progress=False)
    parallel = encode_conversations(convs, tokenizer, "vicuna_v1.1", num_workers=2, progress=False)
    assert all(np.array_equal(a, c) and np.array_equal(b, d) for (a, b), (c, d) in zip(serial, parallel))
    assert len(parallel) == len(convs)


def test_too_long_is_an_error_pointing_to_split(tmp_path, tokenizer):
    data = write(tmp_path / "long.jsonl", [record(0), record(1, words=400), record(2, words=500)])
    with pytest.raises(ValueError, match=r"2 of 3 conversations .* max_length=64 .*'c1', 'c2'.*ds-vicuna data split"):
        build_tokenized_dataset(data, tokenizer, "chatml", 64, cache_dir=tmp_path / "cache", num_workers=1)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_no_trainable_token_is_an_error(tmp_path, tokenizer):
    data = write(tmp_path / "prompts.jsonl", [{"id": "p", "conversations": [{"from": "human", "value": "hello"}]}])
    with pytest.raises(ValueError, match="no sample has a trainable token"):
        build_tokenized_dataset(data, tokenizer, "chatml", 64, cache_dir=tmp_path / "cache", num_workers=1)


def test_unencodable_conversation_is_named(tmp_path, tokenizer):
    bad = {"id": "twice", "conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]}
    data = write(tmp_path / "bad.jsonl", [record(0), bad])
    with pytest.raises(ValueError, match="conversation 'twice'"):
        build_tokenized_dataset(data, tokenizer, "chatml", 64, cache_dir=tmp_path / "cache", num_workers=1)


def _rank_main(rank, world, init_file, data, too_long, cache_dir, out_dir):
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from ds_vicuna.models import embedded_model_path

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        tok = AutoTokenizer.from_pretrained(embedded_model_path())
        try:  # rank 0 fails to build: every rank must raise, none may hang at the barrier
            build_tokenized_dataset(too_long, tok, "chatml", 64, cache_dir=cache_dir, num_workers=1)
            failure = None
        except (ValueError, RuntimeError) as e:
            failure = type(e).__name__
        ds = build_tokenized_dataset(data, tok, "chatml", 256, cache_dir=cache_dir, num_workers=1)
        result = {"from_cache": ds.from_cache, "folder": str(ds.folder), "lengths": ds.lengths.tolist(),
                  "failure": failure}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_multi_rank_rank0_builds_once(tmp_path, data):
    import torch.multiprocessing as mp

    too_long = write(tmp_path / "long.jsonl", [record(0, words=200)])
    mp.spawn(_rank_main, args=(2, str(tmp_path / "init"), str(data), str(too_long), str(tmp_path / "cache"),
                               str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["failure"] for r in ranks] == ["ValueError", "RuntimeError"]
    assert [r["from_cache"] for r in ranks] == [False, True]  # rank 0 built; rank 1 waited and loaded
    assert ranks[0]["folder"] == ranks[1]["folder"] and ranks[0]["lengths"] == ranks[1]["lengths"]
    assert len(list((tmp_path / "cache").iterdir())) == 1
    assert len(TokenizedDataset(ranks[0]["folder"])) == 20
