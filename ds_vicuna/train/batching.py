"""Micro-batches for training: packed rows with per-conversation attention, or padded batches.

    from ds_vicuna.train.batching import make_micro_batches, fetch_micro_batch, collate, configure_model_for_packing
    flatten = configure_model_for_packing(model)             # once: use_cache=False (see below)
    plan = make_micro_batches(ds.lengths, "pack", 2048, micro_batch_size=4, seed=42, epoch=0)
    for micro in plan[resume_skip:]:                         # the plan is a pure function of its arguments
        batch = collate(fetch_micro_batch(ds, micro, "pack"), "pack", 2048, pad_id, flatten)
        n_label_tokens = batch.pop("num_label_tokens")       # an int; the rest are tensors for model(**batch)

Strategies (`Strategy`):
- `pack`: conversations are packed best-fit-decreasing into rows of `max_length` tokens; a micro-batch is
  `micro_batch_size` rows, each row a list of dataset indices. `position_ids` restart at 0 for every
  conversation and no `attention_mask` is returned: transformers (>= 4.56, checked on 5.23) then derives
  per-conversation causal attention from `position_ids` itself (`masking_utils.find_packed_sequence_indices`
  for eager/sdpa/flex; varlen `cu_seqlens` for flash_attention_2, which needs `flatten=True`: one row).
  That detection is skipped when the model builds a KV cache, which it does in training whenever
  `config.use_cache` is True (the default), so `configure_model_for_packing` turns the cache off;
  tests/train/test_packing_loss.py shows both the isolation and what goes wrong without it.
  Transformers shifts labels inside the model, so the first token of every packed conversation gets label
  -100: nothing in the row may predict it from the previous conversation.
- `group`: length-grouped dynamic padding: shuffled, sorted by length inside mega-batches of
  `50 * micro_batch_size`, cut into micro-batches which are shuffled; padded to the longest in the batch.
- `max`: FastChat's recipe: random micro-batches, each padded to `max_length` (the baseline to beat).

Every plan is deterministic for (lengths, strategy, max_length, micro_batch_size, seed, epoch), differs
between epochs, and holds every index exactly once.

Weighted mixes (`data.train_path` listing several files with weights): `weighted_epoch` picks the samples of
one epoch before planning, again a pure function of (sources, weights, seed, epoch), so resuming replays the
same epochs exactly. Weight w: every sample of the source `floor(w)` times, plus a seeded random `w % 1` share
of them once more (a different share each epoch).
"""
from __future__ import annotations

import bisect
import enum
from typing import Sequence

import numpy as np

from ds_vicuna.chat.encoding import IGNORE_INDEX

GROUP_MEGA_BATCHES = 50  # micro-batches per length-sorted mega-batch in the `group` strategy


class Strategy(str, enum.Enum):
    """How samples become micro-batches."""

    PACK = "pack"
    GROUP = "group"
    MAX = "max"


def pack_rows(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Group sample indices into rows whose total length fits `max_length` (best-fit decreasing).

    Samples are placed longest first (ties by index) into the open row with the least room that still fits,
    so the result is deterministic. Rows come out in creation order; indices inside a row in placement order.

    Args:
        lengths: token count of each sample.
        max_length: tokens per row.

    Returns:
        Rows of sample indices; every index appears exactly once.

    Raises:
        ValueError: a sample is empty or longer than `max_length` (naming its index).
    """
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")
    lengths = np.asarray(lengths, dtype=np.int64)
    _check_lengths(lengths, max_length)
    order = np.lexsort((np.arange(len(lengths)), -lengths))  # longest first, ties by index
    rows: list[list[int]] = []
    open_rows: list[tuple[int, int]] = []  # (room left, row id), sorted
    for idx in order.tolist():
        need = int(lengths[idx])
        pos = bisect.bisect_left(open_rows, (need, -1))  # least room that still fits
        if pos == len(open_rows):
            row_id, room = len(rows), max_length
            rows.append([])
        else:
            room, row_id = open_rows.pop(pos)
        rows[row_id].append(idx)
        if room - need > 0:
            bisect.insort(open_rows, (room - need, row_id))
    return rows


def _check_lengths(lengths: np.ndarray, max_length: int) -> None:
    too_long = np.flatnonzero(lengths > max_length)
    if too_long.size:
        first = int(too_long[0])
        raise ValueError(f"sample {first} has {int(lengths[first])} tokens, more than max_length={max_length} "
                         f"({too_long.size} such samples); split long conversations first with "
                         "`ds-vicuna data split IN OUT --model M --template T --max-length N`")
    empty = np.flatnonzero(lengths <= 0)
    if empty.size:
        raise ValueError(f"sample {int(empty[0])} is empty ({empty.size} empty samples)")


def _rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch])


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def weighted_epoch(sources: Sequence[Sequence[int]], weights: Sequence[float], seed: int, epoch: int) -> list[int]:
    """The sample indices one epoch trains on: each source repeated or subsampled by its weight.

    Args:
        sources: per source, its sample indices.
        weights: per source, > 0: every index `floor(w)` times, plus `round((w % 1) * len(source))` of them,
            drawn without replacement by a generator seeded with (seed, epoch, source).
        seed: run seed.
        epoch: epoch number.

    Returns:
        Indices, source after source (the plan shuffles them); with every weight 1, the sources concatenated.

    Raises:
        ValueError: a weight that is not > 0, or a weight per source missing.
    """
    if len(sources) != len(weights):
        raise ValueError(f"{len(sources)} sources but {len(weights)} weights")
    out: list[int] = []
    for s, (indices, weight) in enumerate(zip(sources, weights)):
        if not weight > 0:
            raise ValueError(f"source {s}: weight must be > 0, got {weight}")
        whole, fraction = divmod(float(weight), 1.0)
        out += list(indices) * int(whole)
        extra = round(fraction * len(indices))
        if extra:
            chosen = np.random.default_rng([seed, epoch, s, 1]).choice(len(indices), size=extra, replace=False)
            out += [indices[i] for i in np.sort(chosen).tolist()]
    return out


def make_micro_batches(lengths: Sequence[int], strategy: str, max_length: int, micro_batch_size: int,
                       seed: int, epoch: int) -> list:
    """The micro-batch plan of one epoch: a pure function of its arguments (resume = skip the first k).

    Args:
        lengths: token count of each sample (e.g. `TokenizedDataset.lengths`).
        strategy: "pack", "group" or "max" (see the module docstring).
        max_length: tokens per packed row / padded length for "max"; longer samples are an error.
        micro_batch_size: rows ("pack") or samples ("group", "max") per micro-batch.
        seed: run seed.
        epoch: epoch number; each epoch gets a different order.

    Returns:
        For "group"/"max": a list of micro-batches, each a list of sample indices.
        For "pack": a list of micro-batches, each a list of rows, each row a list of sample indices.
        The last micro-batch may be smaller. Use `fetch_micro_batch` to turn one into `collate` input.

    Raises:
        ValueError: unknown strategy, bad sizes, or a sample longer than `max_length`.
    """
    strategy = Strategy(strategy)
    if micro_batch_size <= 0:
        raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")
    lengths = np.asarray(lengths, dtype=np.int64)
    _check_lengths(lengths, max_length)
    rng = _rng(seed, epoch)
    perm = rng.permutation(len(lengths))
    if strategy is Strategy.PACK:
        # Packing the shuffled order changes which equal-length samples share a row from epoch to epoch.
        rows = [[int(perm[i]) for i in row] for row in pack_rows(lengths[perm], max_length)]
        rows = [rows[i] for i in rng.permutation(len(rows))]
        return _chunks(rows, micro_batch_size)
    if strategy is Strategy.GROUP:
        batches = []
        for mega in _chunks(perm.tolist(), GROUP_MEGA_BATCHES * micro_batch_size):
            mega.sort(key=lambda i: -lengths[i])  # stable: ties keep the shuffled order
            batches += _chunks(mega, micro_batch_size)
        return [batches[i] for i in rng.permutation(len(batches))]
    return _chunks(perm.tolist(), micro_batch_size)


def fetch_micro_batch(dataset, micro_batch: list, strategy: str) -> list:
    """Look up the samples of one planned micro-batch in the shape `collate` takes.

    Args:
        dataset: anything indexable by sample index returning {"input_ids", "labels"}.
        micro_batch: one element of `make_micro_batches(...)`.
        strategy: the strategy that planned it.

    Returns:
        "pack": a list of rows, each a list of examples; otherwise a list of examples.
    """
    if Strategy(strategy) is Strategy.PACK:
        return [[dataset[i] for i in row] for row in micro_batch]
    return [dataset[i] for i in micro_batch]


def padding_stats(lengths: Sequence[int], plan: list, strategy: str, max_length: int) -> tuple[int, int]:
    """(real tokens, tokens fed to the model) for a plan, as `collate` would lay it out (`flatten=False`)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    strategy = Strategy(strategy)
    real = fed = 0
    for micro in plan:
        if strategy is Strategy.PACK:
            real += sum(int(lengths[row].sum()) for row in micro)
            fed += len(micro) * max_length
        else:
            batch_lengths = lengths[micro]
            real += int(batch_lengths.sum())
            fed += len(micro) * (max_length if strategy is Strategy.MAX else int(batch_lengths.max()))
    return real, fed


def _as_list(values) -> list[int]:
    return values.tolist() if hasattr(values, "tolist") else list(values)


def collate(examples: list, strategy: str, max_length: int, pad_token_id: int, flatten: bool = False) -> dict:
    """Tensors for one micro-batch.

    Args:
        examples: from `fetch_micro_batch`: for "pack" a list of rows, each a list of examples; otherwise a list
            of examples. An example is {"input_ids", "labels"} (lists or 1-D integer arrays of equal length).
        strategy: "pack", "group" or "max".
        max_length: row length ("pack"), padded length ("max"), upper bound ("group").
        pad_token_id: id written into padding (its label is always -100).
        flatten: "pack" only: concatenate the rows without padding into one row [1, N] (padding-free), which
            flash_attention_2 needs to see the packing (it only reads position_ids when the batch size is 1).

    Returns:
        "pack": input_ids, labels, position_ids [B, max_length] (int64); no attention_mask (see module docs).
        "group"/"max": input_ids, labels, attention_mask [B, L], L = longest sample / max_length.
        Always also `num_label_tokens`: an int, the tokens that carry a loss after the model's label shift,
        `(labels[:, 1:] != -100).sum()`, for normalising the loss over the global batch. Pop it before
        calling the model.

    Raises:
        ValueError: a row or sample longer than max_length, mismatched input_ids/labels, or flatten without pack.
    """
    strategy = Strategy(strategy)
    if flatten and strategy is not Strategy.PACK:
        raise ValueError(f"flatten=True only applies to strategy 'pack', not {strategy.value!r}")
    if strategy is Strategy.PACK:
        ids, labels, positions = _pack_tensors(examples, max_length, pad_token_id, flatten)
        batch = {"input_ids": ids, "labels": labels, "position_ids": positions}
    else:
        ids, labels, mask = _pad_tensors(examples, max_length, pad_token_id, strategy is Strategy.MAX)
        batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    batch["num_label_tokens"] = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    return batch


def _example_lists(example: dict, where: str) -> tuple[list[int], list[int]]:
    ids, labels = _as_list(example["input_ids"]), _as_list(example["labels"])
    if len(ids) != len(labels):
        raise ValueError(f"{where}: input_ids has {len(ids)} tokens but labels has {len(labels)}")
    if not ids:
        raise ValueError(f"{where}: empty example")
    return ids, labels


def _pack_tensors(rows: list, max_length: int, pad_token_id: int, flatten: bool):
    import torch

    out_ids, out_labels, out_pos = [], [], []
    for r, row in enumerate(rows):
        ids, labels, pos = [], [], []
        for e, example in enumerate(row):
            e_ids, e_labels = _example_lists(example, f"row {r} example {e}")
            ids += e_ids
            labels += [IGNORE_INDEX] + e_labels[1:]  # nothing before it in the row may predict its first token
            pos += range(len(e_ids))
        if len(ids) > max_length:
            raise ValueError(f"row {r} holds {len(ids)} tokens, more than max_length={max_length}")
        if not flatten:
            pad = max_length - len(ids)
            ids += [pad_token_id] * pad
            labels += [IGNORE_INDEX] * pad
            pos += range(pad)  # padding is a segment of its own: nothing real attends to it
        out_ids.append(ids), out_labels.append(labels), out_pos.append(pos)
    if flatten:
        out_ids, out_labels, out_pos = ([sum(x, [])] for x in (out_ids, out_labels, out_pos))
    return (torch.tensor(out_ids, dtype=torch.long),  # [B, L]
            torch.tensor(out_labels, dtype=torch.long),  # [B, L]
            torch.tensor(out_pos, dtype=torch.long))  # [B, L]


def _pad_tensors(examples: list, max_length: int, pad_token_id: int, to_max: bool):
    import torch

    pairs = [_example_lists(ex, f"example {i}") for i, ex in enumerate(examples)]
    longest = max(len(ids) for ids, _ in pairs)
    if longest > max_length:
        raise ValueError(f"an example holds {longest} tokens, more than max_length={max_length}")
    width = max_length if to_max else longest
    ids = torch.full((len(pairs), width), pad_token_id, dtype=torch.long)  # [B, L]
    labels = torch.full((len(pairs), width), IGNORE_INDEX, dtype=torch.long)  # [B, L]
    mask = torch.zeros((len(pairs), width), dtype=torch.long)  # [B, L]
    for b, (e_ids, e_labels) in enumerate(pairs):
        ids[b, :len(e_ids)] = torch.tensor(e_ids)
        labels[b, :len(e_labels)] = torch.tensor(e_labels)
        mask[b, :len(e_ids)] = 1
    return ids, labels, mask


def configure_model_for_packing(model) -> bool:
    """Make a Hugging Face causal LM isolate packed conversations: turn its KV cache off for training.

    With `use_cache=True` (the config default) the model builds a cache even in training and transformers then
    skips the packed-sequence detection, so packed conversations would silently attend to each other.

    Returns:
        The `flatten` argument `collate` needs for this model (True for flash attention).

    Raises:
        ValueError: an attention implementation that cannot see packing from position_ids.
    """
    config = model.config
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if not any(impl.startswith(name) for name in ("eager", "sdpa", "flash_attention", "flex_attention")):
        raise ValueError(f"attention implementation {impl!r} cannot isolate packed conversations; use sdpa, eager, "
                         "flex_attention or flash_attention_2, or batching 'group'")
    config.use_cache = False
    return impl.startswith("flash_attention")
