"""Checkpoints describe themselves: `ds_vicuna.json` beside the weights is the model card.

    write_model_meta(out, "vicuna_v1.1", ["</s>"], max_length=2048, base_model="lmsys/...", step=1200)
    card = read_model_card(out)          # ModelCard(template="vicuna_v1.1", stop_strings=("</s>",), ...)

Training and export write it; `ds_vicuna.model.loading.load_chat_model` (used by serve/, eval/ and the demo) reads
the template, stop strings and context length from it instead of guessing them from the model path. A folder
without a card (e.g. the embedded SmolLM2, or any plain Hugging Face checkpoint) uses its tokenizer's own chat
template. Fields (all but `template` optional):

    template        chat template name (ds_vicuna.chat.templates)
    stop_strings    texts that end a reply (the template's control token after a reply)
    max_length      the training sequence length
    context_length  the longest prompt + reply to serve (default: the model config's max_position_embeddings)
    base_model      what training started from
    step            the optimizer step of the weights
    dtype           the weights' precision as saved (bf16, fp16, fp32)
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

META_FILE = "ds_vicuna.json"
DEFAULT_TEMPLATE = "tokenizer"  # a plain HF folder (e.g. the embedded SmolLM2) uses its own chat template
CARD_DTYPES = ("bf16", "fp16", "fp32")


@dataclass(frozen=True)
class ModelCard:
    """What a checkpoint says about itself (see the module docstring for each field)."""

    template: str = DEFAULT_TEMPLATE
    stop_strings: tuple[str, ...] = ()
    max_length: int | None = None
    context_length: int | None = None
    base_model: str | None = None
    step: int | None = None
    dtype: str | None = None
    extra: dict = field(default_factory=dict)
    """Keys this version does not know, kept as written."""


def write_model_meta(folder: str | Path, template: str, stop_strings: list[str], **extra) -> Path:
    """Write `ds_vicuna.json` (template name, stop strings, plus e.g. max_length, base_model, step, dtype).

    Raises:
        ValueError: a known field with the wrong type (the card would not load), naming the field.
    """
    meta = {"template": template, "stop_strings": list(stop_strings), **extra}
    path = Path(folder) / META_FILE
    _card_from_dict(meta, f"{path} (being written)")
    path.write_text(json.dumps(meta, indent=2) + "\n")
    return path


def read_model_meta(folder: str | Path) -> dict:
    """The folder's `ds_vicuna.json` as a dict, or `{"template": "tokenizer"}` for a folder without one.

    Raises:
        ValueError: the file exists but is not a valid card (names the file and the field).
    """
    path = Path(folder) / META_FILE
    if not path.is_file():
        return {"template": DEFAULT_TEMPLATE}
    meta = _load_json(path)
    _card_from_dict(meta, str(path))
    return meta


def read_model_card(folder: str | Path) -> ModelCard:
    """The folder's model card; a folder without `ds_vicuna.json` gets the default card (its own chat template).

    Raises:
        ValueError: not JSON, or a field of the wrong type or value; the message names the file and the field.
    """
    path = Path(folder) / META_FILE
    if not path.is_file():
        return ModelCard()
    return _card_from_dict(_load_json(path), str(path))


def _load_json(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    return meta


def _card_from_dict(meta: dict, where: str) -> ModelCard:
    def bad(key: str, expected: str) -> ValueError:
        return ValueError(f"{where}: field '{key}' must be {expected}, got {meta.get(key)!r}")

    template = meta.get("template")
    if not isinstance(template, str) or not template:
        raise bad("template", "a template name (string)")
    stops = meta.get("stop_strings", [])
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad("stop_strings", "a list of non-empty strings")
    for key in ("max_length", "context_length"):
        value = meta.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise bad(key, "a positive integer or null")
    step = meta.get("step")
    if step is not None and (not isinstance(step, int) or isinstance(step, bool) or step < 0):
        raise bad("step", "a non-negative integer or null")
    base = meta.get("base_model")
    if base is not None and not isinstance(base, str):
        raise bad("base_model", "a string or null")
    dtype = meta.get("dtype")
    if dtype is not None and dtype not in CARD_DTYPES:
        raise bad("dtype", f"one of {', '.join(CARD_DTYPES)} or null")
    known = {"template", "stop_strings", "max_length", "context_length", "base_model", "step", "dtype"}
    return ModelCard(template, tuple(stops), meta.get("max_length"), meta.get("context_length"), base, step, dtype,
                     {k: v for k, v in meta.items() if k not in known})
