"""The training loss: summed next-token cross-entropy over labelled (assistant) tokens.

The trainer divides the sum by the optimizer step's global label-token count (see `train.optimizer_step`), so
every assistant token weighs the same whatever the micro-batch size, accumulation or world size.

A batch holds either `labels` (aligned with input_ids; the loss shifts them by one) or `shift_labels` (already
shifted: position t holds the label of token t + 1, IGNORE_INDEX where none), which sequence parallelism needs
because a shard cannot see its neighbour's next token (`ds_vicuna.sequence_parallel.shard_batch`).
"""
from __future__ import annotations

from ds_vicuna.encoding import IGNORE_INDEX


def next_token_labels(batch: dict):
    """[B, T] labels aligned with the logits that predict them: `shift_labels`, or `labels` shifted left by one
    (the last position predicts nothing)."""
    import torch.nn.functional as F

    if "shift_labels" in batch:
        return batch["shift_labels"]
    return F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)


def count_label_tokens(batch: dict) -> int:
    """Tokens that carry a (shifted) label: what the loss is averaged over."""
    return int((next_token_labels(batch) != IGNORE_INDEX).sum())


def token_loss_sum(engine, batch: dict):
    """Forward pass; the summed next-token cross-entropy over labelled tokens (fp32).

    The labels are shifted, not the logits: a [B, T-1, V] slice of the logits would be copied to flatten it.
    """
    import torch.nn.functional as F

    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    logits = engine(**inputs).logits  # [B, T, V]
    labels = next_token_labels(batch)  # [B, T]
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")
