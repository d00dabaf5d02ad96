"""KV-cache surgery (`serve.kv_cache`) on a stand-in cache: rows cut out, masked leading columns dropped, two
batches stacked with the shorter one left-padded."""
from __future__ import annotations

import torch

from ds_vicuna.serve.kv_cache import append_ones, select_rows, stack_batches


class Layer:
    def __init__(self, keys):
        self.keys, self.values = keys, keys + 100


class Cache:
    """The two things the engine uses of a transformers `DynamicCache`: `layers` and `batch_select_indices`."""

    def __init__(self, keys):
        self.layers = [Layer(keys.clone()), Layer(keys.clone() * 2)]

    def batch_select_indices(self, index):
        for layer in self.layers:
            layer.keys, layer.values = layer.keys[index], layer.values[index]


def keys(batch: int, length: int, start: float = 1.0):
    return torch.arange(start, start + batch * length, dtype=torch.float).reshape(batch, 1, length, 1)  # [B,H,T,D]


def test_append_ones():
    mask = torch.tensor([[0, 1], [1, 1]])
    assert append_ones(mask).tolist() == [[0, 1, 1], [1, 1, 1]]


def test_stack_batches_left_pads_the_shorter_batch_with_masked_zeros():
    a, b = Cache(keys(1, 3)), Cache(keys(2, 1, start=10))
    cache, mask = stack_batches(a, torch.ones(1, 3, dtype=torch.long), b, torch.ones(2, 1, dtype=torch.long))
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 1]]
    assert cache.layers[0].keys[:, 0, :, 0].tolist() == [[1, 2, 3], [0, 0, 10], [0, 0, 11]]
    assert cache.layers[1].values.shape == (3, 1, 3, 1)


def test_select_rows_drops_rows_and_the_columns_no_remaining_row_attends_to():
    cache = Cache(keys(3, 3))
    mask = torch.tensor([[1, 1, 1], [0, 1, 1], [0, 0, 1]])
    next_ids = torch.tensor([[7], [8], [9]])
    cache, mask, kept = select_rows(cache, mask, next_ids, [1, 2])
    assert mask.tolist() == [[1, 1], [0, 1]]
    assert cache.layers[0].keys[:, 0, :, 0].tolist() == [[5, 6], [8, 9]]
    assert kept is next_ids  # the caller indexes its next tokens itself
