"""Ulysses sequence parallelism: row sharding, config checks, and the real 2-rank DeepSpeed run (gloo) against one
process on the whole rows: loss, every gradient, and a short training run with evaluation and a checkpoint."""
import sys
from types import SimpleNamespace

import pytest
import torch

from ds_vicuna.config import ConfigError, load_config
from ds_vicuna.chat.encoding import IGNORE_INDEX
from ds_vicuna.train.loss import count_label_tokens
from ds_vicuna.train.sequence_parallel import check_sequence_parallel, shard_batch
from tests.support.tiny_llama import (REPO, deepspeed_command, make_tiny_model, run_checked, write_conversations,
                                      write_train_config)

X = IGNORE_INDEX


def test_shard_batch_pads_shifts_and_splits_a_packed_row():
    # two conversations (3 + 4 tokens) packed into a row of 7: padded to 8 for 2 shards
    batch = {"input_ids": torch.tensor([[11, 12, 13, 21, 22, 23, 24]]),
             "labels": torch.tensor([[X, 12, 13, X, X, 23, 24]]),
             "position_ids": torch.tensor([[0, 1, 2, 0, 1, 2, 3]])}
    shards = [shard_batch(batch, rank, 2, pad_token_id=0, rows=1) for rank in (0, 1)]
    assert [s["input_ids"].tolist() for s in shards] == [[[11, 12, 13, 21]], [[22, 23, 24, 0]]]
    assert shards[0]["position_ids"].tolist() == [[0, 1, 2, 0]] and shards[1]["position_ids"].tolist() == [[1, 2, 3, 0]]
    # token t carries the label of token t + 1; 13 -> 21 and 21 -> 22 carry none (a new conversation, a prompt)
    assert shards[0]["shift_labels"].tolist() == [[12, 13, X, X]]
    assert shards[1]["shift_labels"].tolist() == [[23, 24, X, X]]
    assert sum(count_label_tokens(s) for s in shards) == count_label_tokens(batch) == 4
    assert set(shards[0]) == {"input_ids", "position_ids", "shift_labels"}


def test_shard_batch_keeps_a_label_that_crosses_the_shard_boundary():
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "labels": torch.tensor([[X, 6, 7, 8]])}
    first, second = (shard_batch(batch, rank, 2, pad_token_id=0, rows=1) for rank in (0, 1))
    assert first["shift_labels"].tolist() == [[6, 7]]  # token 6 predicts 7, which lives in the other shard
    assert second["shift_labels"].tolist() == [[8, X]]
    assert first["position_ids"].tolist() == [[0, 1]] and second["position_ids"].tolist() == [[2, 3]]


def test_shard_batch_fills_a_short_micro_batch_with_padding_rows():
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "labels": torch.tensor([[5, 6, 7, 8]]),
             "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    shard = shard_batch(batch, 1, 2, pad_token_id=0, rows=2)
    assert shard["input_ids"].tolist() == [[7, 8], [0, 0]] and shard["shift_labels"].tolist() == [[8, X], [X, X]]
    assert shard["position_ids"].tolist() == [[2, 3], [2, 3]] and "attention_mask" not in shard
    with pytest.raises(ValueError, match="3 rows"):
        shard_batch({k: v.expand(3, -1) for k, v in batch.items()}, 0, 2, pad_token_id=0, rows=2)


def test_sequence_parallel_config_is_checked():
    llama, zero3 = SimpleNamespace(num_attention_heads=4, num_key_value_heads=2), {"zero_optimization": {"stage": 3}}
    check_sequence_parallel(2, 4, llama, "sdpa", zero3)
    check_sequence_parallel(4, 4, llama, "flash_attention_2", zero3)  # 2 kv heads replicated over 4 ranks
    with pytest.raises(ConfigError, match="must divide the world size 3"):
        check_sequence_parallel(2, 3, llama, "sdpa", zero3)
    with pytest.raises(ConfigError, match="9 attention heads"):  # SmolLM2-135M
        check_sequence_parallel(2, 2, SimpleNamespace(num_attention_heads=9, num_key_value_heads=3), "sdpa", zero3)
    with pytest.raises(ConfigError, match="model.attn_implementation eager"):
        check_sequence_parallel(2, 2, llama, "eager", zero3)
    for ds in ({"zero_optimization": {"stage": 2}}, {"zero_optimization": {"stage": 3, "reduce_scatter": False}}):
        with pytest.raises(ConfigError, match="needs ZeRO stage 3 with reduce_scatter"):
            check_sequence_parallel(2, 2, llama, "sdpa", ds)
    check_sequence_parallel(1, 3, llama, "eager", {})  # off: nothing to check
    cfg = load_config(None, ["--sequence_parallel_size", "2", "--global_batch_size", "4", "--micro_batch_size", "1"])
    assert cfg.data_parallel_size(4) == 2 and cfg.gradient_accumulation_steps(4) == 2
    with pytest.raises(ConfigError, match="data-parallel size"):
        cfg.gradient_accumulation_steps(8 * 2)  # 8 replicas x micro 1 > global 4
    with pytest.raises(ConfigError, match="train.sequence_parallel_size must be > 0"):
        load_config(None, ["--sequence_parallel_size", "0"])


@pytest.fixture(scope="module")
def sp_config(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sp")
    model = make_tiny_model(tmp / "model")
    data = write_conversations(tmp / "train.jsonl", n=12, seed=3)
    return write_train_config(tmp / "cfg.yaml", model, data, deepspeed="zero3", output_dir=tmp / "out",
                              learning_rate=1.0e-3, warmup_ratio=0.0, epochs=1), tmp


@pytest.mark.slow
def test_two_rank_sequence_parallel_step_equals_one_rank_on_whole_rows(sp_config):
    """Same loss and gradients as one process on the whole packed rows (so packing isolation holds too)."""
    cfg, tmp = sp_config
    script = REPO / "tests/support/scripts/grad_check.py"
    run_checked([sys.executable, str(script), str(cfg), str(tmp / "one.pt"), "2x1"])
    run_checked(deepspeed_command(2, script, cfg, tmp / "sp.pt", "2x1:sequence_parallel_size=2"))
    one, sp = torch.load(tmp / "one.pt")["2x1"], torch.load(tmp / "sp.pt")["2x1:sequence_parallel_size=2"]
    assert sp["tokens"] == one["tokens"] > 0
    assert sp["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert sp["grads"].keys() == one["grads"].keys()
    for key, grad in one["grads"].items():
        assert grad.abs().sum() > 0, key
        torch.testing.assert_close(sp["grads"][key], grad, rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.slow
def test_two_rank_sequence_parallel_training_run_stops_and_resumes(sp_config):
    """The trainer itself (fit, evaluate, save) under sequence parallelism tracks the one-process run, and its
    checkpoint resumes exactly: on the same 2-rank group, and on one rank without sequence parallelism (the
    elastic path: converted to DeepSpeed's universal format)."""
    import shutil

    cfg, tmp = sp_config
    script = REPO / "tests/support/scripts/train_and_dump.py"
    common = ["--global_batch_size", "2", "--micro_batch_size", "1", "--max_steps", "3", "--max_length", "256",
              "--eval_path", str(tmp / "train.jsonl")]
    sp_args = ["--sequence_parallel_size", "2", "--output_dir", str(tmp / "o2")]
    run_checked([sys.executable, str(script), str(tmp / "one.pt"), str(cfg), *common, "--output_dir", str(tmp / "o1")])
    run_checked(deepspeed_command(2, script, tmp / "sp.pt", cfg, *common, *sp_args, "--stop_after_steps", "2"))
    shutil.copytree(tmp / "o2", tmp / "o3")
    run_checked(deepspeed_command(2, script, tmp / "sp_resumed.pt", cfg, *common, *sp_args, "--resume", "auto"))
    run_checked([sys.executable, str(script), str(tmp / "shrunk.pt"), str(cfg), *common,
                 "--output_dir", str(tmp / "o3"), "--resume", "auto"])
    one, sp = torch.load(tmp / "one.pt"), torch.load(tmp / "sp.pt")
    assert sorted(one["losses"]) == [1, 2, 3] and sorted(sp["losses"]) == [1, 2]
    assert sp["checkpoint"].endswith("step-000002")
    for name in ("sp_resumed", "shrunk"):
        resumed = torch.load(tmp / f"{name}.pt")
        losses = {**sp["losses"], **resumed["losses"]}
        assert sorted(resumed["losses"]) == [3], name
        for step, loss in one["losses"].items():
            assert losses[step] == pytest.approx(loss, rel=1e-4), (name, step)
        for key, param in one["params"].items():
            torch.testing.assert_close(resumed["params"][key], param, rtol=1e-4, atol=1e-5, msg=f"{name} {key}")
    metrics = [line for line in (tmp / "o2" / "metrics.jsonl").read_text().splitlines() if "eval_loss" in line]
    assert metrics


@pytest.mark.slow
def test_lora_under_sequence_parallelism_resumes_from_one_rank_on_two(sp_config):
    """LoRA adapters (dropout 0: the same masks whoever holds the tokens) trained on one process stop at step 2 and
    resume on a 2-rank sequence-parallel group (one world size to another): losses and the trained adapters equal
    the uninterrupted one-process run, and the frozen base is unchanged."""
    import shutil

    cfg, tmp = sp_config
    script = REPO / "tests/support/scripts/train_and_dump.py"
    common = ["--global_batch_size", "2", "--micro_batch_size", "1", "--max_steps", "3", "--max_length", "256",
              "--model.lora", "{}", "--model.lora.r", "4", "--model.lora.dropout", "0", "--learning_rate", "5e-3"]
    run_checked([sys.executable, str(script), str(tmp / "lora_one.pt"), str(cfg), *common,
                 "--output_dir", str(tmp / "lora1")])
    run_checked([sys.executable, str(script), str(tmp / "lora_first.pt"), str(cfg), *common,
                 "--output_dir", str(tmp / "lora2"), "--stop_after_steps", "2"])
    shutil.copytree(tmp / "lora2", tmp / "lora_sp")
    run_checked(deepspeed_command(2, script, tmp / "lora_resumed.pt", cfg, *common, "--sequence_parallel_size", "2",
                                  "--output_dir", str(tmp / "lora_sp"), "--resume", "auto"))
    one, first, resumed = (torch.load(tmp / f"lora_{name}.pt") for name in ("one", "first", "resumed"))
    assert one["trainable"] and all(".lora_" in name for name in one["trainable"])
    assert sorted(first["losses"]) == [1, 2] and sorted(resumed["losses"]) == [3]
    losses = {**first["losses"], **resumed["losses"]}
    for step, loss in one["losses"].items():
        assert losses[step] == pytest.approx(loss, rel=1e-4), step
    assert resumed["master"].keys() == one["master"].keys() == set(one["trainable"])
    for name, weight in one["master"].items():
        torch.testing.assert_close(resumed["master"][name], weight, rtol=1e-4, atol=1e-6, msg=name)
    frozen = [name for name in one["params"] if name not in one["master"]]
    assert frozen
    for name in frozen:  # the base: what the one-process run has, bit for bit
        assert torch.equal(resumed["params"][name], one["params"][name]), name
