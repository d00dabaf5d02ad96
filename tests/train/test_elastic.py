"""Resume at another world size, the parts that need no training run (the runs: tests/train/test_loop_resume.py and
tests/launch/test_launch_scripts.py)."""
import json
from types import SimpleNamespace

import pytest

from ds_vicuna.train.checkpoint import COMPLETE_MARKER, CheckpointError
from ds_vicuna.train.elastic import (micro_batch_seed, prepare_resume, saved_world_size, universal_copy,
                               with_universal_load)


def fake_checkpoint(folder, ranks: int, stage3: bool = True):
    folder.mkdir(parents=True)
    for rank in range(ranks):
        if stage3:
            (folder / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt").write_bytes(b"not a checkpoint")
        (folder / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"not a checkpoint")
    (folder / COMPLETE_MARKER).write_text(json.dumps({"step": 2}))
    return folder


def test_saved_world_size_counts_the_partitions(tmp_path):
    assert saved_world_size(fake_checkpoint(tmp_path / "a", 8)) == 8
    assert saved_world_size(fake_checkpoint(tmp_path / "b", 1)) == 1
    stage0 = tmp_path / "c"
    stage0.mkdir()
    (stage0 / "mp_rank_00_model_states.pt").write_bytes(b"")
    assert saved_world_size(stage0) is None  # nothing partitioned: DeepSpeed loads it at any world size


def test_same_world_size_or_stage0_needs_no_conversion(tmp_path):
    folder = fake_checkpoint(tmp_path / "step-000002", 2)
    assert prepare_resume(folder, SimpleNamespace(world_size=2, is_main=True)) is None
    assert not universal_copy(folder).exists()


def test_a_failed_conversion_stops_the_run_and_leaves_nothing_half_written(tmp_path, capsys):
    folder = fake_checkpoint(tmp_path / "step-000002", 2)
    with pytest.raises(CheckpointError, match=r"step-000002: DeepSpeed's universal checkpoint conversion failed"):
        prepare_resume(folder, SimpleNamespace(world_size=1, is_main=True))
    assert "written by 2 rank(s), this run has 1: converting it once" in capsys.readouterr().out
    assert not universal_copy(folder).exists() and not list(folder.glob(".universal.tmp-*"))
    assert not (folder / "latest_universal").exists()


def test_universal_load_flag_is_added_without_touching_the_rest():
    ds = {"zero_optimization": {"stage": 3}, "checkpoint": {"tag_validation": "Warn"}}
    out = with_universal_load(ds)
    assert out["checkpoint"] == {"tag_validation": "Warn", "load_universal": True}
    assert ds["checkpoint"] == {"tag_validation": "Warn"} and out["zero_optimization"] == {"stage": 3}


def test_micro_batch_seed_is_a_pure_function_of_seed_epoch_index():
    assert micro_batch_seed(42, 1, 7) == micro_batch_seed(42, 1, 7)
    assert len({micro_batch_seed(s, e, i) for s in (1, 42) for e in range(3) for i in range(500)}) == 3000
    assert all(0 <= micro_batch_seed(2**40, 9, i) < 2**63 for i in range(10))
