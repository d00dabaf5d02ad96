"""Checkpoints describe themselves: `ds_vicuna.json` beside the weights names the chat template and its stops.

serve/ and eval/ read the template from here instead of guessing it from the model path.
"""
from __future__ import annotations

import json
from pathlib import Path

META_FILE = "ds_vicuna.json"
DEFAULT_TEMPLATE = "tokenizer"  # a plain HF folder (e.g. the embedded SmolLM2) uses its own chat template


def write_model_meta(folder: str | Path, template: str, stop_strings: list[str], **extra) -> Path:
    """Write `ds_vicuna.json` (template name, stop strings, plus e.g. max_length, base_model, step)."""
    path = Path(folder) / META_FILE
    path.write_text(json.dumps({"template": template, "stop_strings": stop_strings, **extra}, indent=2) + "\n")
    return path


def read_model_meta(folder: str | Path) -> dict:
    """The folder's `ds_vicuna.json`, or `{"template": "tokenizer"}` for a folder without one.

    Raises:
        ValueError: the file exists but is not a JSON object with a string "template".
    """
    path = Path(folder) / META_FILE
    if not path.is_file():
        return {"template": DEFAULT_TEMPLATE}
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("template"), str):
        raise ValueError(f"{path}: expected an object with a string 'template'")
    return meta
