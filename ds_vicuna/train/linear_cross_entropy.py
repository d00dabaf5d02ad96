"""lm_head + cross-entropy over hidden states in chunks, gradients computed in the same pass (the memory-lean
loss of ds_vicuna/train/loss.py; pure tensor math, no model).

    loss = linear_cross_entropy_sum(hidden, lm_head.weight, lm_head.bias, shifted_labels, chunk_tokens=1024)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ds_vicuna.chat.encoding import IGNORE_INDEX


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             labels: torch.Tensor, chunk_tokens: int, rows: torch.Tensor | None = None
                             ) -> torch.Tensor:
    """sum over labelled t of cross_entropy(hidden[t] @ weight.T + bias, labels[t]), in chunks (fp32, 0-dim).

    Equal to the plain path (logits in the weight's dtype, then fp32 cross-entropy) within float rounding.

    Args:
        hidden: [B, T, H] final hidden states.
        weight: [V, H] output layer weight; bias: [V] or None.
        labels: [B, T] target ids, IGNORE_INDEX where none.
        chunk_tokens: rows of logits computed at a time.
        rows: [N] the flattened positions of `labels` that are not IGNORE_INDEX, when known (computed on the host
            in collate: `loss.add_label_index`); else found here, a host sync since N sizes the chunks.
    """
    flat = labels.reshape(-1)  # [B*T]
    if rows is None:
        rows = (flat != IGNORE_INDEX).nonzero().squeeze(1)  # [N] labelled positions
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
