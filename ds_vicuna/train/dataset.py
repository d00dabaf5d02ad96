"""Tokenize once, in parallel, streaming, into a sharded memory-mapped cache: conversations file -> dataset.

    from ds_vicuna.train.dataset import build_tokenized_dataset, build_mixture
    ds = build_tokenized_dataset("data/train.jsonl", tokenizer, "vicuna_v1.1", max_length=2048,
                                 cache_dir="runs/cache")
    ds[0]          # {"input_ids": int32 array, "labels": int32 array}
    ds.lengths     # tokens per sample (what batching plans with)
    mix = build_mixture([("sharegpt.jsonl", 1.0), ("identity.jsonl", 3.0)], tokenizer, "vicuna_v1.1", 2048)

The cache folder `<cache_dir>/tokenized-<key>` holds
- `input_ids-00000.bin`, `labels-00000.bin`, ...: shards of raw little-endian int32 tokens, samples back to back
  (a sample never spans two shards; a shard holds at most `SHARD_TOKENS` tokens),
- `offsets.npy`: int64, sample i is tokens `[offsets[i], offsets[i+1])` of the shards laid end to end,
- `conversation_ids.jsonl`: the source conversation id of each sample, one JSON string a line,
- `meta.json`: the key, template, max_length, mask, counts and the shard list.
Building streams: conversations are read, encoded in worker processes (in input order) and appended to the
open shard, so building holds a few chunks of ids at a time, never the whole data set; training memory-maps
the shards. The key is a sha256 over the data file's bytes, the tokenizer (its backend JSON and special
tokens), the template (name and Jinja), max_length, the mask strategy and `ENCODING_VERSION`, so a change to any
of them builds a new cache. A cache is written to a temporary folder and renamed into place, so a folder that
exists is complete. In a multi-rank run (torch.distributed initialised) rank 0 builds while the others wait at a
barrier, then every rank loads the same files; `cache_dir` must be shared by the ranks.

A mixture (`build_mixture`, `data.train_path` listing several files) is one dataset per file and a sampling
weight per file; `MixedDataset.epoch_indices` says which samples an epoch trains on (`batching.weighted_epoch`).
"""
from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import shutil
import tempfile
from array import array
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ds_vicuna.chat.encoding import IGNORE_INDEX, MaskStrategy, get_encoder
from ds_vicuna.chat.templates import get_template, special_token_strings
from ds_vicuna.data.parallel import ordered_map

# 2: labels honour a message's weight 0 and a truncated reply's stop token; 3: sharded cache layout
ENCODING_VERSION = 3  # bump when encoding.py changes what it produces: every cache is rebuilt
SHARD_TOKENS = 1 << 26  # tokens per shard file at most (256 MiB of int32)
TOKEN_DTYPE = np.dtype("<i4")
_CHUNK = 64  # conversations per task sent to a worker
_MIN_BYTES_PER_WORKER = 1 << 20  # smaller files are encoded in-process (a pool costs more than it saves)
log = logging.getLogger(__name__)


class TokenizedDataset:
    """Encoded samples in memory-mapped int32 shards plus offsets.

    Attributes:
        folder: the cache folder it was loaded from.
        from_cache: True when this build found the folder already there (nothing was encoded).
        meta: the contents of meta.json (key, template, max_length, counts, shards ...).
        lengths: tokens per sample, int64 array.
    """

    def __init__(self, folder: str | os.PathLike, from_cache: bool = True):
        self.folder = Path(folder)
        self.from_cache = from_cache
        self.meta = json.loads((self.folder / "meta.json").read_text())
        self._offsets = np.load(self.folder / "offsets.npy")
        self.lengths = np.diff(self._offsets)
        self._ids, self._labels, self._first_sample = [], [], []
        first = 0
        for shard in self.meta["shards"]:
            self._ids.append(_memmap(self.folder / shard["input_ids"]))
            self._labels.append(_memmap(self.folder / shard["labels"]))
            self._first_sample.append(first)
            first += shard["samples"]

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample {index} out of range for {len(self)} samples")
        index %= len(self)
        shard = bisect.bisect_right(self._first_sample, index) - 1
        base = self._offsets[self._first_sample[shard]]
        start, end = self._offsets[index] - base, self._offsets[index + 1] - base
        return {"input_ids": np.array(self._ids[shard][start:end]), "labels": np.array(self._labels[shard][start:end])}

    def conversation_ids(self) -> list[str]:
        """The source conversation id of each sample."""
        with open(self.folder / "conversation_ids.jsonl", encoding="utf-8") as f:
            return [json.loads(line) for line in f]


def _memmap(path: Path) -> np.ndarray:
    if path.stat().st_size == 0:  # numpy cannot map an empty file
        return np.zeros(0, dtype=TOKEN_DTYPE)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r")


class MixedDataset:
    """Several datasets as one index space (source after source), each with a sampling weight.

    Args:
        parts: one dataset per source file.
        weights: per source: each epoch trains on every sample `floor(w)` times plus a seeded share `w % 1` of
            them once more (w = 3: identity data three times an epoch; w = 0.5: a different half each epoch).
        names: per source, for messages and statistics (the file paths).
    """

    def __init__(self, parts: Sequence, weights: Sequence[float], names: Sequence[str]):
        if not len(parts) == len(weights) == len(names) or not parts:
            raise ValueError("a mixture needs one weight and one name per part, and at least one part")
        if any(not w > 0 for w in weights):
            raise ValueError(f"mixture weights must be > 0, got {list(weights)}")
        self.parts, self.weights, self.names = list(parts), [float(w) for w in weights], [str(n) for n in names]
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])
        self.lengths = np.concatenate([np.asarray(p.lengths, dtype=np.int64) for p in self.parts])
        self.from_cache = all(getattr(p, "from_cache", True) for p in self.parts)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range for {len(self)} samples")
        part = self.source_of(index)
        return self.parts[part][index - int(self.starts[part])]

    def source_of(self, index: int) -> int:
        """Which source (0-based) sample `index` comes from."""
        return int(np.searchsorted(self.starts, index, side="right")) - 1

    def epoch_indices(self, indices: Sequence[int], seed: int, epoch: int) -> list[int]:
        """The samples (of `indices`) one epoch trains on, repeated or subsampled by weight; a pure function.

        With one source of weight 1 these are `indices` themselves, in order.
        """
        from ds_vicuna.train.batching import weighted_epoch

        indices = np.asarray(indices, dtype=np.int64)
        source = np.searchsorted(self.starts, indices, side="right") - 1
        groups = [indices[source == s].tolist() for s in range(len(self.parts))]
        return weighted_epoch(groups, self.weights, seed, epoch)

    def token_shares(self) -> list[float]:
        """Each source's share of the tokens one epoch trains on (weights applied)."""
        weighted = [w * float(np.sum(p.lengths)) for p, w in zip(self.parts, self.weights)]
        total = sum(weighted) or 1.0
        return [x / total for x in weighted]


def tokenizer_fingerprint(tokenizer) -> str:
    """Everything about a tokenizer that changes encodings: its backend JSON and its special tokens."""
    specials = {name: str(getattr(tokenizer, name, None))
                for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
    return tokenizer.backend_tokenizer.to_str() + json.dumps([specials, special_token_strings(tokenizer)],
                                                             sort_keys=True)


def cache_key(data_path: str | os.PathLike, tokenizer, template: str, max_length: int,
              mask: str = "assistant", skip_bad: bool = False) -> str:
    """sha256 (hex) over data bytes, tokenizer, template, max_length, mask and ENCODING_VERSION."""
    tmpl = get_template(template)
    digest = hashlib.sha256()
    with open(data_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    for part in (tokenizer_fingerprint(tokenizer), tmpl.name, tmpl.jinja(tokenizer),
                 json.dumps([max_length, MaskStrategy(mask).value, skip_bad, ENCODING_VERSION])):
        digest.update(b"\0" + part.encode())
    return digest.hexdigest()


# ---- encoding (one process or a pool) -----------------------------------------------------------------
class _EncodeWorker:
    """What a worker process runs: one conversation -> (its id, input_ids, labels), int32 arrays."""

    def __init__(self, tokenizer, template: str, mask: str):
        self.encoder, self.mask = get_encoder(tokenizer, template), mask

    def __call__(self, conv) -> tuple[str, np.ndarray, np.ndarray]:
        try:
            enc = self.encoder.encode(conv.messages, max_length=None, mask=self.mask)
        except ValueError as e:  # MessageError / EncodingError: name the conversation
            raise ValueError(f"conversation {conv.id!r}: {e}") from None
        return conv.id, np.asarray(enc["input_ids"], dtype=TOKEN_DTYPE), np.asarray(enc["labels"], dtype=TOKEN_DTYPE)


def iter_encoded(conversations: Iterable, tokenizer, template: str, mask: str = "assistant",
                 num_workers: int = 1) -> Iterable[tuple[str, np.ndarray, np.ndarray]]:
    """(conversation id, input_ids, labels) per conversation, in input order, lazily, in `num_workers` processes.

    Workers are forked, so the tokenizer (with tokens added in memory, e.g. by `add_template_tokens`) is the
    parent's own; where fork does not exist it travels pickled.

    Raises:
        ValueError: a conversation that cannot be encoded, naming it.
    """
    return ordered_map(_EncodeWorker, (tokenizer, template, mask), conversations, num_workers, chunk_size=_CHUNK,
                       context="fork")


def encode_conversations(conversations: list, tokenizer, template: str, mask: str = "assistant",
                         num_workers: int | None = None, progress: bool = True) -> list[tuple[np.ndarray, np.ndarray]]:
    """Encode a list of conversations in order (a pool when that pays off); see `iter_encoded`.

    Args:
        num_workers: processes; None = one per core (at most 8) for 64+ conversations a worker; 1 = in-process.

    Returns:
        (input_ids, labels) int32 arrays per conversation, in input order.
    """
    from tqdm.auto import tqdm

    workers = num_workers or min(os.cpu_count() or 1, 8)
    if num_workers is None and len(conversations) < 64 * workers:
        workers = 1
    encoded = iter_encoded(conversations, tokenizer, template, mask, workers)
    return [(ids, labels) for _, ids, labels in tqdm(encoded, total=len(conversations), desc="tokenize",
                                                     unit="conv", disable=not progress)]


# ---- building and caching -----------------------------------------------------------------------------
class _ShardWriter:
    """Appends samples to int32 shard files, a new shard every `SHARD_TOKENS` tokens; lengths kept compactly."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.shards: list[dict] = []
        self.lengths = array("q")
        self._files = None
        self._ids_file = open(folder / "conversation_ids.jsonl", "w", encoding="utf-8")

    def _open(self) -> None:
        """Close the current shard and start the next one."""
        self._close_shard()
        name = f"{len(self.shards):05d}"
        shard = {"input_ids": f"input_ids-{name}.bin", "labels": f"labels-{name}.bin", "samples": 0, "tokens": 0}
        self.shards.append(shard)
        self._files = (open(self.folder / shard["input_ids"], "wb"), open(self.folder / shard["labels"], "wb"))

    def _close_shard(self) -> None:
        if self._files:
            for f in self._files:
                f.close()
        self._files = None

    def add(self, ids: np.ndarray, labels: np.ndarray, conversation_id: str) -> None:
        if self._files is None or self.shards[-1]["tokens"] and self.shards[-1]["tokens"] + len(ids) > SHARD_TOKENS:
            self._open()
        self._files[0].write(ids.astype(TOKEN_DTYPE, copy=False).tobytes())
        self._files[1].write(labels.astype(TOKEN_DTYPE, copy=False).tobytes())
        self.shards[-1]["samples"] += 1
        self.shards[-1]["tokens"] += len(ids)
        self.lengths.append(len(ids))
        self._ids_file.write(json.dumps(conversation_id, ensure_ascii=False) + "\n")

    def close(self) -> None:
        if not self.shards:
            self._open()  # an empty dataset still has one (empty) shard
        self._close_shard()
        self._ids_file.close()
        offsets = np.zeros(len(self.lengths) + 1, dtype=np.int64)
        np.cumsum(np.frombuffer(self.lengths, dtype=np.int64), out=offsets[1:])
        np.save(self.folder / "offsets.npy", offsets)


def _write_encoded(folder: Path, data_path, encoded: Iterable, max_length: int) -> dict:
    """Stream `(conversation id, input_ids, labels)` into shards; returns the counts for meta.json.

    Raises:
        ValueError: samples longer than max_length (after the whole pass, saying how many) or no trainable token.
    """
    writer = _ShardWriter(folder)
    counts = Counter()
    too_long, longest = [], 0
    try:
        for conversation_id, ids, labels in encoded:
            counts["conversations"] += 1
            if len(ids) > max_length:
                counts["too_long"] += 1
                too_long += [conversation_id][:5 - len(too_long)]
                longest = max(longest, len(ids))
                continue
            trainable = int(np.count_nonzero(labels != IGNORE_INDEX))
            if not trainable:
                counts["no_label_tokens"] += 1
                continue
            writer.add(ids, labels, conversation_id)
            counts["tokens"] += len(ids)
            counts["label_tokens"] += trainable
    finally:
        writer.close()
    if counts["too_long"]:
        examples = ", ".join(repr(i) for i in too_long)
        raise ValueError(
            f"{data_path}: {counts['too_long']} of {counts['conversations']} conversations encode to more than "
            f"max_length={max_length} tokens (longest {longest}; e.g. {examples}). Nothing is truncated silently: "
            f"split them first with `ds-vicuna data split {data_path} OUT --model M --template T "
            f"--max-length {max_length}`")
    if not len(writer.lengths):
        raise ValueError(f"{data_path}: no sample has a trainable token (every label is {IGNORE_INDEX}); "
                         "check the mask strategy and that conversations contain assistant replies")
    if counts["no_label_tokens"]:
        log.warning("%s: %d of %d conversations have no trainable token and are left out",
                    data_path, counts["no_label_tokens"], counts["conversations"])
    return {"num_samples": len(writer.lengths), "num_tokens": counts["tokens"],
            "num_label_tokens": counts["label_tokens"], "shards": writer.shards,
            "skipped": {"no_label_tokens": counts["no_label_tokens"]}}


def _build(folder: Path, data_path, tokenizer, template: str, max_length: int, mask: str, skip_bad: bool,
           num_workers: int | None, progress: bool) -> None:
    from tqdm.auto import tqdm

    from ds_vicuna.data.formats import ConversationReader

    reader = ConversationReader(data_path, skip_bad=skip_bad)
    workers = num_workers or min(os.cpu_count() or 1, 8)
    if num_workers is None and reader.size < _MIN_BYTES_PER_WORKER * workers:
        workers = 1
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    bar = tqdm(total=reader.size, desc="tokenize", unit="B", unit_scale=True, disable=not progress)

    def encoded():
        for item in iter_encoded(reader, tokenizer, template, mask, workers):
            bar.update(reader.bytes_read - bar.n)
            yield item

    try:
        meta = {"encoding_version": ENCODING_VERSION, "data_path": str(data_path), "template": template,
                "max_length": max_length, "mask": mask}
        meta.update(_write_encoded(tmp, data_path, encoded(), max_length))
        meta["skipped"].update({k.value: n for k, n in reader.skips.items()})
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        os.rename(tmp, folder)  # atomic: a folder that exists is complete
    except OSError:
        if not folder.is_dir():  # another process renaming the same key first is fine
            raise
    finally:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _dist_rank() -> int | None:
    """This process's rank when torch.distributed is initialised, else None."""
    try:
        import torch.distributed as dist
    except ImportError:
        return None
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else None


def build_tokenized_dataset(data_path: str | os.PathLike, tokenizer, template: str, max_length: int,
                            mask: str = "assistant", cache_dir: str | os.PathLike = ".cache/tokenized",
                            num_workers: int | None = None, skip_bad: bool = False,
                            progress: bool = True) -> TokenizedDataset:
    """Encode a conversations file once and cache it; later calls (and other ranks) load the cache.

    Args:
        data_path: ShareGPT/OpenAI JSON or JSONL (see `ds_vicuna.data.formats`).
        tokenizer: a fast Hugging Face tokenizer (with the template's special tokens added).
        template: template name.
        max_length: every sample must fit; longer ones are an error (run `ds-vicuna data split` first).
        mask: "assistant", "last_turn" or "all".
        cache_dir: where cache folders live (shared by all ranks).
        num_workers: encoding processes (None: one per core, at most 8, when the file is big enough).
        skip_bad: skip and count unreadable records instead of raising.
        progress: show a tqdm bar while encoding (only the building rank encodes).

    Returns:
        The dataset; `.from_cache` tells whether it was loaded rather than built.

    Raises:
        ValueError: samples longer than max_length, no trainable token, or a conversation that cannot be encoded
            (naming it). FormatError: an unreadable file or record. RuntimeError: rank 0 failed to build.
    """
    template = get_template(template).name
    mask = MaskStrategy(mask).value
    key = cache_key(data_path, tokenizer, template, max_length, mask, skip_bad)
    folder = Path(cache_dir) / f"tokenized-{key[:24]}"
    rank = _dist_rank()
    built, error = False, None
    if rank in (None, 0) and not folder.is_dir():
        try:
            _build(folder, data_path, tokenizer, template, max_length, mask, skip_bad, num_workers, progress)
            built = True
        except Exception as e:  # other ranks must still leave the barrier
            error = e
    if rank is not None:
        import torch.distributed as dist

        dist.barrier()
    if error is not None:
        raise error
    if not folder.is_dir():
        raise RuntimeError(f"rank {rank}: {folder} was not built; rank 0 failed (see its error) or cache_dir "
                           f"{cache_dir} is not shared between the ranks")
    return TokenizedDataset(folder, from_cache=not built)


def build_mixture(sources: Sequence[tuple[str, float]], tokenizer, template: str, max_length: int,
                  mask: str = "assistant", cache_dir: str | os.PathLike = ".cache/tokenized",
                  num_workers: int | None = None, skip_bad: bool = False, progress: bool = True) -> MixedDataset:
    """`build_tokenized_dataset` for each `(path, weight)` source, as one `MixedDataset`.

    Raises:
        ValueError: as `build_tokenized_dataset`, naming the source file; a weight that is not > 0.
    """
    parts = [build_tokenized_dataset(path, tokenizer, template, max_length, mask, cache_dir, num_workers, skip_bad,
                                     progress) for path, _ in sources]
    return MixedDataset(parts, [w for _, w in sources], [str(path) for path, _ in sources])
