"""The training loss: summed next-token cross-entropy over labelled (assistant) tokens, without the logits.

    loss_sum = token_loss_sum(engine, batch)                      # chunked lm_head + cross-entropy (default)
    loss_sum = token_loss_sum(engine, batch, chunk_tokens=None)   # plain: the whole [B, T, V] logits in fp32
    n = count_label_tokens(batch)                                 # what the trainer divides the sums by
    batch = add_label_index(batch)    # on the host, in collate's process: no GPU sync to learn positions/counts

The trainer divides the sum by the optimizer step's global label-token count (see `train.optimizer_step`), so
every assistant token weighs the same whatever the micro-batch size, accumulation or world size.

Labels: `batch["shift_labels"]` when present (already shifted: position t holds the token position t predicts,
IGNORE_INDEX where none; what a sequence-parallel shard needs, since it cannot see its neighbour's next token),
else `batch["labels"]` shifted by one here.

Chunked path. The plain path holds `logits.float()`: [B, T, V] fp32, 8 GiB for 16K tokens and a 128K vocabulary,
plus as much again for its gradient. Instead, for one forward the model's output layer (lm_head) returns the loss
instead of logits: it takes the hidden states of the labelled positions only and runs lm_head + cross-entropy
`chunk_tokens` rows at a time (`ds_vicuna.train.linear_cross_entropy`), computing each chunk's gradients for
the hidden states and the weight right away (as Liger-Kernel's fused linear cross-entropy does), so at most one
chunk of logits exists at a time and no matmul is recomputed. The loss leaves the model as its `logits` output,
so DeepSpeed ZeRO-3 treats it as the output layer's output: the weight is gathered once for the forward and once
for the backward, as usual.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from ds_vicuna.config import DEFAULT_LOSS_CHUNK_TOKENS
from ds_vicuna.chat.encoding import IGNORE_INDEX

if TYPE_CHECKING:  # annotations only
    import torch

# torch is imported inside the functions: `python -m ds_vicuna.train` imports this module before its stop-signal
# handler is installed, and a signal during a slow import would kill the rank.
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")
LABEL_ROWS, LABEL_COUNT = "label_rows", "num_label_tokens"  # add_label_index's keys
_HEAD_CHECKED = "_ds_vicuna_loss_head_checked"  # set on a model once its output layer passed the check below


class LossHeadError(ValueError):
    """The model changes lm_head's output before returning it, so the chunked loss cannot be used for it."""


def shifted_labels(batch: dict) -> torch.Tensor:
    """[B, T]: the token each position predicts (IGNORE_INDEX where none); `shift_labels` is used as given."""
    import torch.nn.functional as F

    if "shift_labels" in batch:
        return batch["shift_labels"]
    labels = batch["labels"]  # [B, T]
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # [B, T]: the last position predicts nothing


def count_label_tokens(batch: dict) -> int:
    """Tokens that carry a (shifted) label: what the loss is averaged over (`add_label_index`'s count when the
    batch has one: read on the host, no wait for the GPU)."""
    if isinstance(batch.get(LABEL_COUNT), int):
        return batch[LABEL_COUNT]
    return int((shifted_labels(batch) != IGNORE_INDEX).sum())


def add_label_index(batch: dict) -> dict:
    """Adds `label_rows` ([N] int64: the flattened [B*T] positions that carry a shifted label) and
    `num_label_tokens` (N, an int) to a batch still on the host, so the step on the GPU never waits to learn them
    (a `nonzero` or a count read back from the GPU stops the host every micro-batch). Returns the batch."""
    flat = shifted_labels(batch).reshape(-1)  # [B*T]
    rows = (flat != IGNORE_INDEX).nonzero().squeeze(1)  # [N], on the host
    batch[LABEL_ROWS], batch[LABEL_COUNT] = rows, int(rows.numel())
    return batch


def token_loss_sum(engine, batch: dict, chunk_tokens: int | None = DEFAULT_LOSS_CHUNK_TOKENS) -> torch.Tensor:
    """Forward pass; the summed next-token cross-entropy over labelled tokens (fp32, 0-dim).

    Args:
        engine: the DeepSpeed engine or a plain Hugging Face causal LM.
        batch: input_ids [B, T], labels or shift_labels [B, T], and position_ids/attention_mask if any;
            `label_rows` (add_label_index) when present spares the chunked path a host sync.
        chunk_tokens: labelled tokens per lm_head + cross-entropy chunk; None = the plain full-logits path.

    Raises:
        LossHeadError: the chunked path on a model that post-processes its logits (e.g. soft-capping).
    """
    import torch
    import torch.nn.functional as F

    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    labels = shifted_labels(batch)
    if chunk_tokens is None:
        logits = engine(**inputs).logits  # [B, T, V]
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum")
    model = getattr(engine, "module", engine)  # the Hugging Face model inside the DeepSpeed engine
    with _head_returns_loss(model.get_output_embeddings(), labels, chunk_tokens, batch.get(LABEL_ROWS)) as computed:
        loss = engine(**inputs).logits  # 0-dim: the loss, passed through ZeRO-3's output hooks
    if not getattr(model, _HEAD_CHECKED, False):  # once per model (a host sync): nothing transformed it
        if loss.shape != () or not torch.equal(loss.detach(), computed["loss"].detach()):
            raise LossHeadError(
                f"{type(model).__name__} transforms lm_head's output (soft-capping or scaling the logits), so the "
                "chunked loss does not apply to it; set train.loss_chunk_tokens to null")
        setattr(model, _HEAD_CHECKED, True)
    return loss


@contextlib.contextmanager
def _head_returns_loss(head, labels: torch.Tensor, chunk_tokens: int, rows: torch.Tensor | None = None):
    """For one forward, `head(hidden)` returns the summed cross-entropy of `labels` instead of logits."""
    from ds_vicuna.train.linear_cross_entropy import linear_cross_entropy_sum

    computed: dict = {}
    previous = head.__dict__.get("forward")

    def forward(hidden):  # hidden: [B, T, H]
        if hidden.shape[:2] != labels.shape:
            raise ValueError(f"lm_head got hidden states {tuple(hidden.shape)} for labels {tuple(labels.shape)}")
        computed["loss"] = linear_cross_entropy_sum(hidden, head.weight, getattr(head, "bias", None), labels,
                                                    chunk_tokens, rows)
        return computed["loss"]

    head.forward = forward  # an instance attribute: module hooks (ZeRO-3's gathering) still run around it
    try:
        yield computed
    finally:
        if previous is None:
            del head.forward
        else:
            head.forward = previous
