"""Packing, micro-batch plans and collation: exact layouts on hand-made samples, invariants on random ones."""
import numpy as np
import pytest
import torch

from ds_vicuna.train.batching import (collate, fetch_micro_batch, make_micro_batches, pack_rows, padding_stats)

STRATEGIES = ["pack", "group", "max"]


def skewed_lengths(n=2000, max_length=1024, seed=0):
    """Mostly short samples with a long tail, clipped to max_length (what the split stage guarantees)."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(5.0, 0.9, n).astype(int), 8, max_length)


def ex(ids, labels):
    return {"input_ids": ids, "labels": labels}


# ---- pack_rows -------------------------------------------------------------------------------------------
def test_pack_rows_best_fit_decreasing_literal():
    # 6 -> new row (room 2); 5 -> new (3); 4 -> new (4); 3 -> room 3; 2 -> room 2; 1 -> room 4
    assert pack_rows([5, 3, 4, 2, 6, 1], 8) == [[4, 3], [0, 1], [2, 5]]


def test_pack_rows_ties_are_deterministic():
    assert pack_rows([4, 4, 4, 4], 8) == [[0, 1], [2, 3]]


def test_pack_rows_too_long_names_index():
    with pytest.raises(ValueError, match=r"sample 1 has 9 tokens.*max_length=8.*ds-vicuna data split"):
        pack_rows([3, 9, 2], 8)


def test_pack_rows_fit_and_cover():
    lengths = skewed_lengths()
    rows = pack_rows(lengths, 1024)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert max(int(lengths[row].sum()) for row in rows) <= 1024


# ---- plans -----------------------------------------------------------------------------------------------
def flat(plan, strategy):
    if strategy == "pack":
        return [i for micro in plan for row in micro for i in row]
    return [i for micro in plan for i in micro]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_plan_covers_every_index_once_per_epoch(strategy):
    lengths = skewed_lengths(n=777)
    for epoch in range(3):
        plan = make_micro_batches(lengths, strategy, 1024, micro_batch_size=4, seed=7, epoch=epoch)
        assert sorted(flat(plan, strategy)) == list(range(len(lengths)))
        assert all(1 <= len(micro) <= 4 for micro in plan)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_plan_is_pure_and_reshuffled_each_epoch(strategy):
    lengths = skewed_lengths(n=500)
    args = dict(strategy=strategy, max_length=1024, micro_batch_size=4, seed=3)
    first = make_micro_batches(lengths, epoch=0, **args)
    assert make_micro_batches(list(lengths), epoch=0, **args) == first  # resume = skip the first k of this list
    assert make_micro_batches(lengths, epoch=1, **args) != first
    assert make_micro_batches(lengths, epoch=0, **{**args, "seed": 4}) != first


def test_pack_plan_rows_fit():
    lengths = skewed_lengths(n=500)
    for micro in make_micro_batches(lengths, "pack", 1024, 2, seed=0, epoch=0):
        assert all(int(lengths[row].sum()) <= 1024 for row in micro)


def test_group_plan_batches_similar_lengths():
    lengths = np.array([10, 1000, 12, 990, 11, 1010, 9, 995])
    plan = make_micro_batches(lengths, "group", 1024, 2, seed=0, epoch=0)
    assert sorted(sorted(lengths[m].tolist()) for m in plan) == [[9, 10], [11, 12], [990, 995], [1000, 1010]]


def test_padding_share_pack_under_5_percent_and_ordered():
    lengths = skewed_lengths(n=3000)
    share = {}
    for strategy in STRATEGIES:
        plan = make_micro_batches(lengths, strategy, 1024, 4, seed=0, epoch=0)
        real, fed = padding_stats(lengths, plan, strategy, 1024)
        assert real == int(lengths.sum())
        share[strategy] = 1 - real / fed
    assert share["pack"] < 0.05
    assert share["pack"] < share["group"] < 0.5 < share["max"]


def test_plan_rejects_too_long_and_unknown_strategy():
    with pytest.raises(ValueError, match="sample 2"):
        make_micro_batches([5, 5, 20], "group", 16, 2, seed=0, epoch=0)
    with pytest.raises(ValueError, match="'bogus'"):
        make_micro_batches([5], "bogus", 16, 2, seed=0, epoch=0)


# ---- collate ---------------------------------------------------------------------------------------------
ROWS = [[ex([11, 12, 13], [-100, 12, 13]), ex([21, 22], [21, 22])],
        [ex(np.array([31], dtype=np.int32), np.array([31], dtype=np.int32))]]


def test_collate_pack_literal():
    batch = collate(ROWS, "pack", 6, pad_token_id=0)
    assert set(batch) == {"input_ids", "labels", "position_ids", "num_label_tokens"}
    assert batch["input_ids"].tolist() == [[11, 12, 13, 21, 22, 0], [31, 0, 0, 0, 0, 0]]
    # the first token of every packed conversation is -100: the previous conversation must not predict it
    assert batch["labels"].tolist() == [[-100, 12, 13, -100, 22, -100], [-100, -100, -100, -100, -100, -100]]
    # positions restart per conversation; padding is a segment of its own
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0], [0, 0, 1, 2, 3, 4]]
    assert batch["num_label_tokens"] == 3
    assert batch["input_ids"].dtype == torch.long


def test_collate_pack_flatten_literal():
    batch = collate(ROWS, "pack", 6, pad_token_id=0, flatten=True)
    assert batch["input_ids"].tolist() == [[11, 12, 13, 21, 22, 31]]
    assert batch["labels"].tolist() == [[-100, 12, 13, -100, 22, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0]]
    assert batch["num_label_tokens"] == 3


def test_collate_group_and_max_literal():
    examples = [ex([1, 2, 3], [-100, 2, 3]), ex([4, 5], [4, 5])]
    group = collate(examples, "group", 8, pad_token_id=9)
    assert group["input_ids"].tolist() == [[1, 2, 3], [4, 5, 9]]
    assert group["labels"].tolist() == [[-100, 2, 3], [4, 5, -100]]
    assert group["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert group["num_label_tokens"] == 3  # labels[:, 1:]: 2, 3 and 5 (4 is never predicted)
    full = collate(examples, "max", 5, pad_token_id=9)
    assert full["input_ids"].tolist() == [[1, 2, 3, 9, 9], [4, 5, 9, 9, 9]]
    assert full["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]]


def test_collate_errors():
    with pytest.raises(ValueError, match="row 0 holds 5 tokens"):
        collate(ROWS, "pack", 4, pad_token_id=0)
    with pytest.raises(ValueError, match="example 0: input_ids has 2 tokens but labels has 1"):
        collate([ex([1, 2], [1])], "group", 4, pad_token_id=0)


def test_fetch_micro_batch_shapes():
    data = [ex([i], [i]) for i in range(5)]
    assert fetch_micro_batch(data, [[0, 2], [4]], "pack") == [[data[0], data[2]], [data[4]]]
    assert fetch_micro_batch(data, [3, 1], "group") == [data[3], data[1]]


# ---- weighted mixes --------------------------------------------------------------------------------------
def test_weighted_epoch_repeats_and_subsamples_by_weight():
    from ds_vicuna.train.batching import weighted_epoch

    sources = [list(range(0, 100)), list(range(100, 110)), list(range(110, 150))]
    assert weighted_epoch(sources[:1], [1.0], seed=0, epoch=0) == sources[0]  # one file: exactly as before
    epochs = [weighted_epoch(sources, [1.0, 3.0, 0.5], seed=5, epoch=e) for e in range(3)]
    for chosen in epochs:
        counts = np.bincount(chosen, minlength=150)
        assert (counts[:100] == 1).all() and (counts[100:110] == 3).all()  # identity data 3x an epoch
        assert sorted(set(chosen) & set(sources[2])) == [i for i in chosen if i >= 110]  # each at most once
        assert sum(counts[110:]) == 20  # half of the domain file
    assert weighted_epoch(sources, [1.0, 3.0, 0.5], seed=5, epoch=0) == epochs[0]  # pure: resume replays it
    assert epochs[0] != epochs[1]  # a different half each epoch
    assert weighted_epoch(sources, [1.0, 3.0, 0.5], seed=6, epoch=0) != epochs[0]
    assert len(weighted_epoch(sources, [2.25, 1, 1], seed=0, epoch=0)) == 225 + 10 + 40
    with pytest.raises(ValueError, match="source 1: weight must be > 0"):
        weighted_epoch(sources, [1, 0, 1], 0, 0)
