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
