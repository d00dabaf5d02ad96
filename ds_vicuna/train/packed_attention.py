"""SDPA for packed rows: every conversation attends only to itself, read from the row's `position_ids`.

    from ds_vicuna.train.packed_attention import PACKED_SDPA, register_packed_sdpa
    register_packed_sdpa()
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=PACKED_SDPA)

A conversation starts wherever the position does not continue the previous one (transformers'
`find_packed_sequence_indices` rule), so a row's padding, which restarts at 0, is a segment of its own.

Why not transformers' own "sdpa" with the block-diagonal [B, 1, T, T] mask it builds from `position_ids`: on CPU,
SDPA computes every masked block anyway, so a 1024-token row of short conversations pays for 1024^2 scores per
head. Here each conversation runs its own causal SDPA, computing only the sum of len^2 / 2 (2.6x faster
fwd+bwd for a typical bf16 row; BENCHMARKS.md). On GPUs, packed rows do not come here: the trainer picks
flex_attention (a document-causal block mask; `ds_vicuna.train.build.pick_training_attention`), since with a dense
mask SDPA cannot use its flash kernel and computes all T^2 scores. Sequence parallelism uses this as its core
attention on the gathered row (`ds_vicuna.train.sequence_parallel`), where transformers' mask, built for one
shard, is dropped by DeepSpeed; on a GPU that path still builds the dense mask below (splitting a row would cost a
host sync per layer).
"""
from __future__ import annotations

# "sdpa" in the name: transformers then checks the model supports SDPA, as for its own "sdpa".
PACKED_SDPA = "sdpa_ds_vicuna_packed"


def segment_starts(position_ids) -> list[list[int]]:
    """Start index of every conversation in each row of `position_ids` [B, T] (host lists)."""
    import torch

    steps = torch.diff(position_ids, prepend=position_ids[:, :1], dim=-1)  # [B, T]; 0 first: a start
    return [torch.nonzero(row != 1).flatten().tolist() for row in steps]


def packed_sdpa_attention(module, query, key, value, attention_mask, position_ids=None, **kwargs):
    """transformers attention interface: [B, H, T, D] inputs, [B, T, H, D] output, per-conversation causal.

    Without `position_ids` (or with a mask given) this is plain transformers SDPA.
    """
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kwargs.pop("is_causal", None)  # causal is the point; per conversation below
    if attention_mask is not None or position_ids is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if query.device.type != "cpu":  # one fused kernel with the mask; no host sync
        steps = torch.diff(position_ids, prepend=position_ids[:, :1], dim=-1)  # [B, T]
        segment = (steps != 1).cumsum(-1)  # [B, T]
        causal = torch.ones(segment.shape[-1], segment.shape[-1], dtype=torch.bool, device=segment.device).tril()
        mask = ((segment[:, :, None] == segment[:, None, :]) & causal)[:, None]  # [B, 1, T, T]
        return sdpa_attention_forward(module, query, key, value, mask, **kwargs)
    # unbind/split, not indexing: their backward is one stack/cat, where each slice's backward would write a
    # zero-filled full-size gradient per conversation
    rows = []
    for starts, q, k, v in zip(segment_starts(position_ids), query.unbind(0), key.unbind(0), value.unbind(0)):
        lengths = [end - start for start, end in zip(starts, starts[1:] + [q.shape[1]])]
        parts = [sdpa_attention_forward(module, qs[None], ks[None], vs[None], None, is_causal=True, **kwargs)[0]
                 for qs, ks, vs in zip(q.split(lengths, 1), k.split(lengths, 1), v.split(lengths, 1))]
        rows.append(torch.cat(parts, dim=1)[0])  # [T, H, D] from [1, len, H, D] pieces
    return torch.stack(rows), None  # [B, T, H, D]


def _no_mask(*args, **kwargs):
    """The mask function of PACKED_SDPA: none (the attention reads position_ids), so no [B, 1, T, T] is built."""
    return None


def register_packed_sdpa() -> None:
    """Make `PACKED_SDPA` a transformers attention implementation (idempotent, process-wide)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    AttentionMaskInterface.register(PACKED_SDPA, _no_mask)
