"""A weighted data mix in the real trainer (one CPU process, ZeRO-3, tiny Llama): the epoch plans repeat and
subsample the sources by weight, and resuming from a checkpoint reproduces every later loss exactly."""
import json
import shutil
import sys

import pytest
import torch

from tests.support.tiny_llama import REPO, make_tiny_model, run_checked, write_conversations, write_train_config

pytestmark = pytest.mark.slow
DUMP = REPO / "tests/support/scripts/train_and_dump.py"


def test_weighted_mix_resumes_exactly(tmp_path):
    model = make_tiny_model(tmp_path / "model")
    main = write_conversations(tmp_path / "main.jsonl", n=10, seed=1)
    identity = tmp_path / "identity.jsonl"
    identity.write_text("".join(json.dumps({**json.loads(line), "id": f"identity-{i}"}) + "\n" for i, line in
                                enumerate(write_conversations(tmp_path / "i.jsonl", n=4, seed=2).read_text()
                                          .splitlines())))
    mix = [str(main), {"path": str(identity), "weight": 2.5}]
    cfg = write_train_config(tmp_path / "cfg.yaml", model, main, deepspeed="zero3",
                             data_opts={"batching": "group", "max_length": 256, "train_path": mix},
                             learning_rate=3.0e-3, epochs=2, global_batch_size=4, micro_batch_size=2, save_every=4,
                             keep_last=10, max_steps=7)
    run = [sys.executable, str(DUMP)]
    run_checked(run + [tmp_path / "a.pt", cfg, "--output_dir", tmp_path / "A"], timeout=400)
    a = torch.load(tmp_path / "a.pt")
    assert a["step"] == 7  # (10 + 2.5 x 4) samples / 4 a step = 5 steps an epoch: the run crosses into epoch 1
    records = [json.loads(line) for line in (tmp_path / "A/metrics.jsonl").read_text().splitlines()]
    assert {0, 1} == {r["epoch"] for r in records if "loss" in r}
    (tmp_path / "B").mkdir()
    shutil.copytree(tmp_path / "A/step-000004", tmp_path / "B/step-000004")
    (tmp_path / "B/latest").write_text("step-000004")
    run_checked(run + [tmp_path / "b.pt", cfg, "--output_dir", tmp_path / "B", "--resume", "auto"], timeout=400)
    b = torch.load(tmp_path / "b.pt")
    assert sorted(b["losses"]) == [5, 6, 7]
    for step, loss in b["losses"].items():
        assert loss == pytest.approx(a["losses"][step], rel=1e-6, abs=1e-7), step
