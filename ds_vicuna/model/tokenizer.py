"""The one way to load a tokenizer for training a chat template: split, stats and the trainer all use it.

    tokenizer = load_tokenizer("embedded", "chatml")          # or a local Hugging Face checkpoint folder

`data split` promises lengths measured exactly as training encodes; that holds because both sides get their
tokenizer here, with the template's control tokens added the same way. Inference (`ds_vicuna.model.loading`)
loads a checkpoint's tokenizer as saved instead: adding tokens there would give ids the model has no embeddings for.
"""
from __future__ import annotations

import os

from ds_vicuna.chat.templates import add_template_tokens
from ds_vicuna.model.embedded import resolve_model_path


def load_tokenizer(model: str | os.PathLike, template: str):
    """The model's fast tokenizer with the template's control tokens added; a pad token (EOS) when it has none.

    Args:
        model: `embedded` or a local Hugging Face checkpoint folder.
        template: a chat template name (`ds_vicuna.chat.templates.TEMPLATES`).

    Returns:
        The tokenizer; when the template added tokens, the model's embeddings must be resized to `len(tokenizer)`.

    Raises:
        FileNotFoundError: no checkpoint folder there. TemplateError: an unknown template.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model), use_fast=True)
    add_template_tokens(tokenizer, template)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


AUTO_TEMPLATE = "auto"
FALLBACK_TEMPLATE = "vicuna_v1.1"
POSITION_KEYS = ("max_position_embeddings", "max_sequence_length", "seq_length", "n_positions")


def resolve_template(template: str, model: str | os.PathLike) -> tuple[str, str]:
    """`auto` -> the tokenizer's own chat template (`tokenizer`) when it has one, else vicuna_v1.1.

    Returns:
        (template name, why it was chosen); a name other than `auto` comes back as it is.
    """
    if template != AUTO_TEMPLATE:
        return template, "as configured"
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model), use_fast=True)
    if getattr(tokenizer, "chat_template", None):
        return "tokenizer", "template auto: the tokenizer has its own chat template"
    return FALLBACK_TEMPLATE, f"template auto: the tokenizer has no chat template, so {FALLBACK_TEMPLATE}"


def model_positions(model: str | os.PathLike) -> int | None:
    """The most positions the model was trained for (max_position_embeddings or the like in its config.json)."""
    import json

    config = json.loads((resolve_model_path(model) / "config.json").read_text())
    config = config.get("text_config") or config
    for key in POSITION_KEYS:
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_max_length(model: str | os.PathLike, max_length: int, name: str = "data.max_length",
                     rope_scaling: str | None = None) -> None:
    """Refuse sequences longer than the model's positions unless RoPE scaling stretches it to them.

    Raises:
        ValueError: naming `name`, both numbers, and what to change.
    """
    positions = model_positions(model)
    if positions is not None and max_length > positions and not rope_scaling:
        raise ValueError(f"{name} {max_length} is more than the {positions} positions of model {model} "
                         f"(max_position_embeddings in its config.json); lower {name} to {positions} or less, "
                         "or stretch the model with model.rope_scaling: linear or dynamic")
