"""The training loss: summed next-token cross-entropy over labelled (assistant) tokens, without the logits.

    loss_sum = token_loss_sum(engine, batch)                      # chunked lm_head + cross-entropy (default)
    loss_sum = token_loss_sum(engine, batch, chunk_tokens=None)   # plain: the whole [B, T, V] logits in fp32
    n = count_label_tokens(batch)                                 # what the trainer divides the sums by

The trainer divides the sum by the optimizer step's global label-token count (see `train.optimizer_step`), so
every assistant token weighs the same whatever the micro-batch size, accumulation or world size.

Labels: `batch["shift_labels"]` when present (already shifted: position t holds the token position t predicts,
IGNORE_INDEX where none; what a sequence-parallel shard needs, since it cannot see its neighbour's next token),
else `batch["labels"]` shifted by one here.

Chunked path. The plain path holds `logits.float()`: [B, T, V] fp32, 8 GiB for 16K tokens and a 128K vocabulary,
plus as much again for its gradient. Instead, for one forward the model's output layer (lm_head) returns the loss
instead of logits: it takes the hidden states of the labelled positions only and runs lm_head + cross-entropy
`chunk_tokens` rows at a time, computing each chunk's gradients for the hidden states and the weight right away
(as Liger-Kernel's fused linear cross-entropy does), so at most one chunk of logits exists at a time and no
matmul is recomputed. The loss leaves the model as its `logits` output, so DeepSpeed ZeRO-3 treats it as the
output layer's output: the weight is gathered once for the forward and once for the backward, as usual.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ds_vicuna.config import DEFAULT_LOSS_CHUNK_TOKENS
from ds_vicuna.encoding import IGNORE_INDEX

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")
_HEAD_CHECKED = "_ds_vicuna_loss_head_checked"  # set on a model once its output layer passed the check below


class LossHeadError(ValueError):
    """The model changes lm_head's output before returning it, so the chunked loss cannot be used for it."""


def shifted_labels(batch: dict) -> torch.Tensor:
    """[B, T]: the token each position predicts (IGNORE_INDEX where none); `shift_labels` is used as given."""
    if "shift_labels" in batch:
        return batch["shift_labels"]
    labels = batch["labels"]  # [B, T]
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # [B, T]: the last position predicts nothing


def count_label_tokens(batch: dict) -> int:
    """Tokens that carry a (shifted) label: what the loss is averaged over."""
    return int((shifted_labels(batch) != IGNORE_INDEX).sum())


def token_loss_sum(engine, batch: dict, chunk_tokens: int | None = DEFAULT_LOSS_CHUNK_TOKENS) -> torch.Tensor:
    """Forward pass; the summed next-token cross-entropy over labelled tokens (fp32, 0-dim).

    Args:
        engine: the DeepSpeed engine or a plain Hugging Face causal LM.
        batch: input_ids [B, T], labels or shift_labels [B, T], and position_ids/attention_mask if any.
        chunk_tokens: labelled tokens per lm_head + cross-entropy chunk; None = the plain full-logits path.

    Raises:
        LossHeadError: the chunked path on a model that post-processes its logits (e.g. soft-capping).
    """
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    labels = shifted_labels(batch)
    if chunk_tokens is None:
        logits = engine(**inputs).logits  # [B, T, V]
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum")
    model = getattr(engine, "module", engine)  # the Hugging Face model inside the DeepSpeed engine
    with _head_returns_loss(model.get_output_embeddings(), labels, chunk_tokens) as computed:
        loss = engine(**inputs).logits  # 0-dim: the loss, passed through ZeRO-3's output hooks
    if not getattr(model, _HEAD_CHECKED, False):  # once per model (a host sync): nothing transformed it
        if loss.shape != () or not torch.equal(loss.detach(), computed["loss"].detach()):
            raise LossHeadError(
                f"{type(model).__name__} transforms lm_head's output (soft-capping or scaling the logits), so the "
                "chunked loss does not apply to it; set train.loss_chunk_tokens to null")
        setattr(model, _HEAD_CHECKED, True)
    return loss


@contextlib.contextmanager
def _head_returns_loss(head, labels: torch.Tensor, chunk_tokens: int):
    """For one forward, `head(hidden)` returns the summed cross-entropy of `labels` instead of logits."""
    computed: dict = {}
    previous = head.__dict__.get("forward")

    def forward(hidden):  # hidden: [B, T, H]
        if hidden.shape[:2] != labels.shape:
            raise ValueError(f"lm_head got hidden states {tuple(hidden.shape)} for labels {tuple(labels.shape)}")
        computed["loss"] = linear_cross_entropy_sum(hidden, head.weight, getattr(head, "bias", None), labels,
                                                    chunk_tokens)
        return computed["loss"]

    head.forward = forward  # an instance attribute: module hooks (ZeRO-3's gathering) still run around it
    try:
        yield computed
    finally:
        if previous is None:
            del head.forward
        else:
            head.forward = previous


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             labels: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """sum over labelled t of cross_entropy(hidden[t] @ weight.T + bias, labels[t]), in chunks (fp32, 0-dim).

    Equal to the plain path (logits in the weight's dtype, then fp32 cross-entropy) within float rounding.

    Args:
        hidden: [B, T, H] final hidden states.
        weight: [V, H] output layer weight; bias: [V] or None.
        labels: [B, T] target ids, IGNORE_INDEX where none.
        chunk_tokens: rows of logits computed at a time.
    """
    flat = labels.reshape(-1)  # [B*T]
    rows = (flat != IGNORE_INDEX).nonzero().squeeze(1)  # [N] labelled positions (a host sync: N sizes the chunks)
    picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)  # [N, H]
    return _LinearCrossEntropySum.apply(picked, weight, bias, flat.index_select(0, rows), chunk_tokens,
                                        torch.is_grad_enabled())


class _LinearCrossEntropySum(torch.autograd.Function):
    """Chunked lm_head + cross-entropy whose gradients are computed in forward, chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_tokens, grad_enabled):
        # hidden [N, H], weight [V, H], bias [V] | None, targets [N]
        want_h = grad_enabled and hidden.requires_grad
        want_w = grad_enabled and weight.requires_grad
        want_b = grad_enabled and bias is not None and bias.requires_grad
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if want_h else None  # [N, H]
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None  # [V, H]
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_b else None  # [V]
        for start in range(0, hidden.shape[0], chunk_tokens):
            h = hidden[start:start + chunk_tokens]  # [C, H]
            y = targets[start:start + chunk_tokens]  # [C]
            logits = F.linear(h, weight, bias).float()  # [C, V]: rounded like the plain path's logits
            lse = torch.logsumexp(logits, dim=-1)  # [C]
            loss += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
            if not (want_h or want_w or want_b):
                continue
            grad = logits.sub_(lse[:, None]).exp_()  # [C, V] softmax, in place
            grad[torch.arange(len(y), device=y.device), y] -= 1  # d(loss)/d(logits)
            grad = grad.to(hidden.dtype)  # [C, V]: what the plain path's backward feeds its linear layer
            if want_h:
                grad_h[start:start + chunk_tokens] = grad @ weight  # [C, H]
            if want_w:
                grad_w += (grad.t() @ h).float()  # [V, H], accumulated in fp32 across chunks
            if want_b:
                grad_b += grad.float().sum(0)  # [V]
        ctx.save_for_backward(grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                              None if grad_b is None else grad_b.to(bias.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        return (*(_scaled(g, grad_loss) for g in ctx.saved_tensors), None, None, None)


def _scaled(grad: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor | None:
    """grad * scale computed in fp32 and rounded once (the plain path scales in fp32 before its bf16 matmuls)."""
    if grad is None:
        return None
    wide = grad.float()
    wide = wide * scale if wide is grad else wide.mul_(scale)  # never scale the saved tensor in place
    return wide.to(grad.dtype)
