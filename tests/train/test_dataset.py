"""Tokenized dataset cache: exact contents, cache hits, keys, errors and the multi-rank build."""
import json
import os

import numpy as np
import pytest

from ds_vicuna.train.dataset import TokenizedDataset, build_tokenized_dataset, cache_key, encode_conversations
from ds_vicuna.chat.encoding import encode_conversation


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from ds_vicuna.model.embedded import embedded_model_path

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
        [{"role": "user", "content": "question 3 why why why "},
         {"role": "assistant", "content": "answer 3 " + "because " * 3},
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
        "conversation_ids.jsonl", "input_ids-00000.bin", "labels-00000.bin", "meta.json", "offsets.npy"]


def test_shards_read_back_every_sample_and_do_not_depend_on_workers(tmp_path, tokenizer, monkeypatch):
    import ds_vicuna.train.dataset as dataset

    monkeypatch.setattr(dataset, "SHARD_TOKENS", 200)  # a few samples a shard
    data = write(tmp_path / "many.jsonl", [record(i, words=i % 9) for i in range(150)])
    serial = build_tokenized_dataset(data, tokenizer, "vicuna_v1.1", 256, cache_dir=tmp_path / "a", num_workers=1,
                                     progress=False)
    parallel = build_tokenized_dataset(data, tokenizer, "vicuna_v1.1", 256, cache_dir=tmp_path / "b", num_workers=2,
                                       progress=False)
    shards = serial.meta["shards"]
    assert len(shards) > 10 and all(s["tokens"] <= 200 for s in shards)
    assert sum(s["samples"] for s in shards) == len(serial) == 150
    for name in ["offsets.npy", "conversation_ids.jsonl"] + [s[k] for s in shards for k in ("input_ids", "labels")]:
        assert (serial.folder / name).read_bytes() == (parallel.folder / name).read_bytes(), name
    for i in (0, 1, 57, 149, -1):
        conv = record(i % 150, words=(i % 150) % 9)
        messages = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
                    for t in conv["conversations"]]
        expected = encode_conversation(messages, tokenizer, "vicuna_v1.1")
        assert serial[i]["input_ids"].tolist() == expected["input_ids"]
        assert serial[i]["labels"].tolist() == expected["labels"]
    assert serial.meta["num_tokens"] == int(serial.lengths.sum())


def test_cache_key_changes_with_every_input(tmp_path, data, tokenizer):
    base = cache_key(data, tokenizer, "chatml", 256)
    assert cache_key(data, tokenizer, "chatml", 256) == base
    other = write(tmp_path / "other.jsonl", [record(i) for i in range(21)])
    variants = [cache_key(data, tokenizer, "vicuna_v1.1", 256), cache_key(data, tokenizer, "chatml", 512),
                cache_key(other, tokenizer, "chatml", 256), cache_key(data, tokenizer, "chatml", 256, mask="all")]
    assert len({base, *variants}) == 5


def test_parallel_equals_serial(tokenizer):
    from ds_vicuna.data.formats import Conversation
    from ds_vicuna.chat.messages import Message, Role

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

    from ds_vicuna.model.embedded import embedded_model_path

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


def test_mixture_plans_by_weight_and_stays_pure(tmp_path, tokenizer):
    from ds_vicuna.config import load_config
    from ds_vicuna.train.dataset import MixedDataset, build_mixture
    from ds_vicuna.train.loop import plan_epoch

    main = write(tmp_path / "main.jsonl", [record(i) for i in range(30)])
    identity = write(tmp_path / "identity.jsonl", [{**record(i), "id": f"id{i}"} for i in range(4)])
    mix = build_mixture([(main, 1.0), (identity, 2.5)], tokenizer, "chatml", 256, cache_dir=tmp_path / "cache",
                        num_workers=1, progress=False)
    assert isinstance(mix, MixedDataset) and len(mix) == 34 and mix.source_of(30) == 1
    assert mix[31]["input_ids"].tolist() == mix.parts[1][1]["input_ids"].tolist()
    shares = mix.token_shares()
    identity_tokens = 2.5 * mix.parts[1].lengths.sum()
    assert shares[1] == pytest.approx(identity_tokens / (identity_tokens + mix.parts[0].lengths.sum()))
    cfg = load_config(None, ["--train_path", f"[{main}, {{path: {identity}, weight: 2.5}}]", "--batching", "group",
                             "--micro_batch_size", "2", "--global_batch_size", "2"])
    plans = [plan_epoch(cfg, mix, list(range(len(mix))), epoch) for epoch in range(2)]
    for plan in plans:
        counts = np.bincount([i for micro in plan for i in micro], minlength=34)
        assert (counts[:30] == 1).all() and sorted(counts[30:]) == [2, 2, 3, 3]  # 2.5 x 4 = 10 identity samples
    assert plan_epoch(cfg, mix, list(range(len(mix))), 0) == plans[0]  # a pure function: resume replays it
    assert plans[0] != plans[1]
    with pytest.raises(ValueError, match="weights must be > 0"):
        MixedDataset(mix.parts, [1.0, 0.0], ["a", "b"])
