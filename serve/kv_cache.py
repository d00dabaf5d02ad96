"""Surgery on a batch's Hugging Face KV cache (`DynamicCache`) and attention mask, for continuous batching.

    mask = append_ones(mask)                                     # [B, T] -> [B, T+1] before a decode step
    cache, mask, next_ids = select_rows(cache, mask, next_ids, keep)   # drop finished rows
    cache, mask = stack_batches(cache_a, mask_a, cache_b, mask_b)      # join a prefilled batch to the running one

Caches are left-padded: a row's real tokens end at the last column; masked columns hold zeros.
"""
from __future__ import annotations


def append_ones(mask):
    """`mask` [B, T] with a column of ones appended: [B, T+1]."""
    import torch

    return torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)


def select_rows(cache, mask, next_ids, keep: list[int]):
    """Keep rows `keep` of the cache, mask and next tokens; drop leading columns no remaining row attends to."""
    import torch

    index = torch.tensor(keep, dtype=torch.long, device=mask.device)
    if len(keep) < mask.shape[0]:
        cache.batch_select_indices(index)
        mask = mask[index]
    first = int(mask.any(0).nonzero()[0, 0])  # the earliest position any remaining row attends to
    if first > 0:
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
        mask = mask[:, first:]
    return cache, mask, next_ids


def stack_batches(cache_a, mask_a, cache_b, mask_b):
    """Stack two batches' caches along the batch; the shorter one is left-padded with masked zeros."""
    import torch
    import torch.nn.functional as F

    length = max(mask_a.shape[1], mask_b.shape[1])
    pad_a, pad_b = length - mask_a.shape[1], length - mask_b.shape[1]
    for layer_a, layer_b in zip(cache_a.layers, cache_b.layers):  # keys/values: [B, H, T, D]
        layer_a.keys = torch.cat([F.pad(layer_a.keys, (0, 0, pad_a, 0)), F.pad(layer_b.keys, (0, 0, pad_b, 0))])
        layer_a.values = torch.cat([F.pad(layer_a.values, (0, 0, pad_a, 0)),
                                    F.pad(layer_b.values, (0, 0, pad_b, 0))])
    mask = torch.cat([F.pad(mask_a, (pad_a, 0)), F.pad(mask_b, (pad_b, 0))])  # [Ba+Bb, T]
    return cache_a, mask
