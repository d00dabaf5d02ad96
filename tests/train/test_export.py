"""Export's pieces that need no checkpoint (the export of real ZeRO-3 checkpoints: tests/train/test_loop_resume.py)."""
import os

import pytest
import torch

from ds_vicuna.train.checkpoint import CheckpointError
from ds_vicuna.train.export import check_weights, drop_mapped_pages, expected_weights, parse_size


@pytest.mark.parametrize("text,size", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("1.5kb", 1500), ("123", 123),
                                       ("2 TB", 2 * 10**12)])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["5XB", "", "-1GB", "0", "GB"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="expected a size like 5GB"):
        parse_size(text)


def rss_file_kb() -> int:
    """This process's resident file-backed pages (what a memory-mapped read adds to RSS)."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("RssFile:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc for RSS")
def test_dropping_mapped_pages_frees_them_and_keeps_the_values(tmp_path):
    torch.save({"w": torch.arange(8 * 2**20, dtype=torch.float32)}, tmp_path / "w.pt")  # 32 MB
    mapped = torch.load(tmp_path / "w.pt", mmap=True)["w"]
    before = rss_file_kb()
    assert float(mapped.double().sum()) == (8 * 2**20 - 1) * 8 * 2**20 / 2  # reads every page
    assert rss_file_kb() - before > 24_000
    drop_mapped_pages([mapped])
    assert rss_file_kb() - before < 4_000
    assert torch.equal(mapped[:5], torch.arange(5, dtype=torch.float32))  # read again from the file
    assert int(mapped[-1]) == 8 * 2**20 - 1
    ordinary = torch.arange(2**20, dtype=torch.float32)
    drop_mapped_pages([ordinary])  # not a file mapping: left alone (MADV_DONTNEED would zero it)
    assert int(ordinary[-1]) == 2**20 - 1 and int(ordinary[4096]) == 4096


def test_expected_weights_leave_out_tied_duplicates():
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    expected, tied = expected_weights(config)
    assert tied == {"lm_head.weight"} and expected["model.embed_tokens.weight"] == ((64, 16), None)
    state = {name: torch.empty(shape) for name, (shape, _) in expected.items()}
    check_weights(None, "hf", {**state, "lm_head.weight": state["model.embed_tokens.weight"]}, expected, tied)
    state["model.norm.weight"] = torch.empty(17)
    del state["model.layers.0.mlp.up_proj.weight"]
    with pytest.raises(CheckpointError, match=r"missing \['model.layers.0.mlp.up_proj.weight'\].*"
                                              r"model.norm.weight \(17,\) vs \(16,\)"):
        check_weights("ckpt", "hf", {**state, "extra": torch.empty(1)}, expected, tied)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_exported_weights_get_the_mode_the_umask_gives(tmp_path, umask, mode):
    """safetensors writes 0600 whatever the umask; the export gives the shards what `open()` would."""
    import stat

    from ds_vicuna.train.export import write_shards

    previous = os.umask(umask)
    try:
        write_shards(tmp_path, {"model.safetensors": ["w"]}, {"w": torch.ones(2, 2)}, [], None, progress=False)
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "model.safetensors").stat().st_mode) == mode
