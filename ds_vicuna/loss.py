"""The training loss: summed next-token cross-entropy over labelled (assistant) tokens.

The trainer divides the sum by the optimizer step's global label-token count (see `train.optimizer_step`), so
every assistant token weighs the same whatever the micro-batch size, accumulation or world size.
"""
from __future__ import annotations

from ds_vicuna.encoding import IGNORE_INDEX


def count_label_tokens(batch: dict) -> int:
    """Tokens that carry a (shifted) label: what the loss is averaged over."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def token_loss_sum(engine, batch: dict):
    """Forward pass; the summed next-token cross-entropy over labelled tokens (fp32)."""
    import torch.nn.functional as F

    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    logits = engine(**inputs).logits  # [B, T, V]
    shift_logits = logits[:, :-1].float()  # [B, T-1, V]
    shift_labels = batch["labels"][:, 1:]  # [B, T-1]
    return F.cross_entropy(shift_logits.flatten(0, 1), shift_labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")
