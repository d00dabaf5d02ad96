"""Checkpoint folders: resume picks the newest complete one; partial ones are ignored; pruning keeps K."""
import json

import pytest
import torch

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


class FakeCuda:
    """torch.cuda on a rank of an 8-GPU node that resumes where only `count` GPUs exist, but every rank sees all
    of them (deepspeed, torchrun): only `current` is this rank's; any other index is an error, as on a GPU."""

    def __init__(self, count: int, current: int):
        self.count, self.current, self.states = count, current, {i: torch.tensor([i], dtype=torch.uint8)
                                                                 for i in range(count)}

    def _check(self, device):
        if not 0 <= device < self.count:
            raise RuntimeError(f"invalid device ordinal {device} of {self.count}")

    def get_rng_state(self, device="cuda"):
        self._check(device)
        return self.states[device].clone()

    def set_rng_state(self, state, device="cuda"):
        self._check(device)
        self.states[device] = state.clone()

    def get_rng_state_all(self):
        return [self.states[i].clone() for i in range(self.count)]

    def set_rng_state_all(self, states):
        for i, state in enumerate(states):
            self.set_rng_state(state, i)


def fake_cuda(monkeypatch, count: int, current: int) -> FakeCuda:
    fake = FakeCuda(count, current)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: fake.count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: fake.current)
    for name in ("get_rng_state", "set_rng_state", "get_rng_state_all", "set_rng_state_all"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    return fake


@pytest.mark.parametrize("saved_on, resumed_on", [(8, 1), (8, 2), (2, 8)])
def test_cuda_rng_state_is_the_ranks_own_device_only(monkeypatch, saved_on, resumed_on):
    from ds_vicuna.train.checkpoint import capture_rng_state, restore_rng_state

    writer = fake_cuda(monkeypatch, saved_on, current=saved_on - 1)  # the last rank of the first run
    writer.states[saved_on - 1] = torch.tensor([42], dtype=torch.uint8)
    state = capture_rng_state()
    assert torch.equal(state["cuda"], torch.tensor([42], dtype=torch.uint8))  # one device's state, not a list
    reader = fake_cuda(monkeypatch, resumed_on, current=resumed_on - 1)
    restore_rng_state(state)  # 8 -> 1: the old code indexed GPUs 1..7, which this node lacks
    assert torch.equal(reader.states[resumed_on - 1], torch.tensor([42], dtype=torch.uint8))
    assert all(int(reader.states[i]) == i for i in range(resumed_on - 1))  # the other GPUs are untouched


def test_an_old_checkpoint_with_every_gpus_rng_state_restores_this_devices_entry(monkeypatch):
    from ds_vicuna.train.checkpoint import capture_rng_state, restore_rng_state

    fake_cuda(monkeypatch, 8, current=0)
    state = {**capture_rng_state(), "cuda": [torch.tensor([100 + i], dtype=torch.uint8) for i in range(8)]}
    reader = fake_cuda(monkeypatch, 2, current=1)
    restore_rng_state(state)
    assert int(reader.states[1]) == 101 and int(reader.states[0]) == 0
    reader = fake_cuda(monkeypatch, 2, current=1)
    restore_rng_state({**state, "cuda": state["cuda"][:1]})  # no entry for this device: left as it is
    assert int(reader.states[1]) == 1
