"""Checkpoint folders: resume picks the newest complete one; partial ones are ignored; pruning keeps K."""
import json

import pytest

from ds_vicuna.train.checkpoint import (COMPLETE_MARKER, CheckpointError, TrainingProgress, checkpoint_name,
                                  find_resume_path, prune_checkpoints, resolve_resume)


def make(root, step, complete=True):
    folder = root / checkpoint_name(step)
    folder.mkdir(parents=True)
    (folder / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        (folder / COMPLETE_MARKER).write_text(json.dumps({"step": step}))
    return folder


def test_names():
    assert checkpoint_name(200) == "step-000200"


def test_partial_checkpoint_is_ignored_by_auto(tmp_path):
    make(tmp_path, 200)
    make(tmp_path, 400, complete=False)  # crashed mid-save
    (tmp_path / "latest").write_text("step-000200")
    assert find_resume_path(tmp_path) == tmp_path / "step-000200"
    assert resolve_resume("auto", tmp_path) == tmp_path / "step-000200"
    with pytest.raises(CheckpointError, match="incomplete"):
        resolve_resume(str(tmp_path / "step-000400"), tmp_path)


def test_latest_pointing_at_partial_falls_back(tmp_path):
    make(tmp_path, 100)
    make(tmp_path, 200, complete=False)
    (tmp_path / "latest").write_text("step-000200")
    assert find_resume_path(tmp_path) == tmp_path / "step-000100"


def test_complete_newer_than_latest_wins(tmp_path):
    # crash after the marker but before the pointer moved: the folder is whole, so it is used
    make(tmp_path, 100)
    make(tmp_path, 200)
    (tmp_path / "latest").write_text("step-000100")
    assert find_resume_path(tmp_path) == tmp_path / "step-000200"


def test_fresh_start(tmp_path):
    assert resolve_resume("auto", tmp_path / "none") is None
    assert resolve_resume(None, tmp_path) is None
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        resolve_resume(str(tmp_path / "missing"), tmp_path)


def test_output_dir_as_resume_path(tmp_path):
    make(tmp_path, 100)
    (tmp_path / "latest").write_text("step-000100")
    assert resolve_resume(str(tmp_path), tmp_path / "other") == tmp_path / "step-000100"


def test_prune_keeps_last_k(tmp_path):
    for step in (100, 200, 300):
        make(tmp_path, step)
    make(tmp_path, 50, complete=False)
    make(tmp_path, 400, complete=False)  # newer partial (maybe being written): kept
    prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000200", "step-000300", "step-000400"]


def test_progress_roundtrip_ignores_unknown_keys():
    progress = TrainingProgress.from_dict({"step": 3, "epoch": 1, "micro_batch_in_epoch": 8, "future": 1})
    assert (progress.step, progress.epoch, progress.micro_batch_in_epoch) == (3, 1, 8)
