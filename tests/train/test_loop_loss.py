"""The loss is the mean over all assistant tokens of the optimizer step, whatever micro-batch/accumulation/ranks,
with the chunked or the plain loss, with or without gradient checkpointing (ZeRO-3, DeepSpeed's own engine)."""
import sys
from pathlib import Path

import pytest
import torch

from tests.support.tiny_llama import (REPO, deepspeed_command, make_tiny_model, run_checked, write_conversations,
                                      write_train_config)

pytestmark = pytest.mark.slow
PLAIN_LOSS = "4x1:loss_chunk_tokens=null"
NO_GC = "4x1:gradient_checkpointing=false"


def write_config(tmp_path: Path) -> Path:
    model = make_tiny_model(tmp_path / "model")
    data = write_conversations(tmp_path / "train.jsonl", n=8, seed=1)
    cfg = write_train_config(tmp_path / "cfg.yaml", model, data, deepspeed="zero3", data_opts={"batching": "group"},
                             output_dir=tmp_path / "out", learning_rate=1.0e-3, warmup_ratio=0.0, epochs=1)
    return cfg


def test_micro_batching_accumulation_and_ranks_give_the_same_step(tmp_path):
    cfg = write_config(tmp_path)
    script = REPO / "tests/support/scripts/grad_check.py"
    run_checked([sys.executable, str(script), str(cfg), str(tmp_path / "one.pt"), "4x1", "1x4", PLAIN_LOSS, NO_GC])
    run_checked(deepspeed_command(2, script, cfg, tmp_path / "two.pt", "1x2"))
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    reference = one["4x1"]  # chunked loss (the default), gradient checkpointing on (the default)
    lengths = {r["tokens"] for r in (*one.values(), two["1x2"])}
    assert len(lengths) == 1 and reference["tokens"] > 0
    for name, other in (("micro 1 x GAS 4", one["1x4"]), ("2 ranks x micro 1 x GAS 2", two["1x2"]),
                        ("plain full-logits loss", one[PLAIN_LOSS]), ("no gradient checkpointing", one[NO_GC])):
        assert other["loss"] == pytest.approx(reference["loss"], rel=1e-5), name
        assert other["grads"].keys() == reference["grads"].keys()
        for key, grad in reference["grads"].items():
            assert grad.abs().sum() > 0, key
            torch.testing.assert_close(other["grads"][key], grad, rtol=1e-4, atol=1e-6, msg=f"{name}: {key}")
