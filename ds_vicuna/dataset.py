"""Tokenize once, in parallel, and cache on disk: conversations file -> `TokenizedDataset`.

    from ds_vicuna.dataset import build_tokenized_dataset
    ds = build_tokenized_dataset("data/train.jsonl", tokenizer, "vicuna_v1.1", max_length=2048,
                                 cache_dir="runs/cache")
    ds[0]          # {"input_ids": int32 array, "labels": int32 array}
    ds.lengths     # tokens per sample (what batching plans with)

The cache folder `<cache_dir>/tokenized-<key>` holds `input_ids.npy`, `labels.npy` (all samples back to back,
int32), `offsets.npy` (sample i is `[offsets[i], offsets[i+1])`, int64), `conversation_ids.json` and
`meta.json`. The key is a sha256 over the data file's bytes, the tokenizer (its backend JSON and special
tokens), the template (name and Jinja), max_length, the mask strategy and `ENCODING_VERSION`, so a change to any of
them builds a new cache. A cache is written to a temporary folder and renamed into place, so a folder that
exists is complete. In a multi-rank run (torch.distributed initialised) rank 0 builds while the others wait at a
barrier, then every rank loads the same files (memory-mapped); `cache_dir` must be shared by the ranks.
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ds_vicuna.encoding import IGNORE_INDEX, MaskStrategy, get_encoder, special_token_strings
from ds_vicuna.templates import get_template

ENCODING_VERSION = 1  # bump when encoding.py changes what it produces: every cache is rebuilt
_ARRAYS = ("input_ids", "labels", "offsets")
_CHUNK = 64  # conversations per task sent to a worker
_MIN_PER_WORKER = 64  # below this many conversations per worker, encoding in-process is faster
log = logging.getLogger(__name__)


class TokenizedDataset:
    """Encoded samples stored as flat int32 arrays plus offsets, memory-mapped.

    Attributes:
        folder: the cache folder it was loaded from.
        from_cache: True when this build found the folder already there (nothing was encoded).
        meta: the contents of meta.json (key, template, max_length, counts ...).
        lengths: tokens per sample, int64 array.
    """

    def __init__(self, folder: str | os.PathLike, from_cache: bool = True):
        self.folder = Path(folder)
        self.from_cache = from_cache
        self.meta = json.loads((self.folder / "meta.json").read_text())
        self._ids = np.load(self.folder / "input_ids.npy", mmap_mode="r")
        self._labels = np.load(self.folder / "labels.npy", mmap_mode="r")
        self._offsets = np.load(self.folder / "offsets.npy")
        self.lengths = np.diff(self._offsets)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample {index} out of range for {len(self)} samples")
        start, end = self._offsets[index], self._offsets[index + 1]
        return {"input_ids": np.array(self._ids[start:end]), "labels": np.array(self._labels[start:end])}

    def conversation_ids(self) -> list[str]:
        """The source conversation id of each sample."""
        return json.loads((self.folder / "conversation_ids.json").read_text())


def tokenizer_fingerprint(tokenizer) -> str:
    """Everything about a tokenizer that changes encodings: its backend JSON and its special tokens."""
    specials = {name: str(getattr(tokenizer, name, None)) for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
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
# Per worker process, set once by the pool initializer (so the tokenizer crosses the process boundary once per
# worker, not once per task): {"encoder": ConversationEncoder, "mask": str}. Never used in the parent.
_worker_encoder = {}


def _init_worker(tokenizer_bytes: bytes, template: str, mask: str) -> None:
    _worker_encoder["encoder"] = get_encoder(pickle.loads(tokenizer_bytes), template)
    _worker_encoder["mask"] = mask


def _encode_chunk(chunk: list) -> list[tuple[np.ndarray, np.ndarray]]:
    return _encode_all(_worker_encoder["encoder"], chunk, _worker_encoder["mask"])


def _encode_all(encoder, conversations: list, mask: str) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for conv in conversations:
        try:
            enc = encoder.encode(conv.messages, max_length=None, mask=mask)
        except ValueError as e:  # MessageError / EncodingError: name the conversation
            raise ValueError(f"conversation {conv.id!r}: {e}") from e
        out.append((np.asarray(enc["input_ids"], dtype=np.int32), np.asarray(enc["labels"], dtype=np.int32)))
    return out


def encode_conversations(conversations: list, tokenizer, template: str, mask: str = "assistant",
                         num_workers: int | None = None, progress: bool = True) -> list[tuple[np.ndarray, np.ndarray]]:
    """Encode conversations in order, in a process pool when that pays off.

    The tokenizer travels to the workers pickled (not by `name_or_path`), so tokens added in memory (e.g. by
    `add_template_tokens`) are kept.

    Args:
        conversations: `formats.Conversation` records.
        tokenizer: a fast Hugging Face tokenizer.
        template: template name.
        mask: mask strategy.
        num_workers: processes; None = one per core (at most 8); 1 = in this process.
        progress: show a tqdm bar.

    Returns:
        (input_ids, labels) int32 arrays per conversation, in input order.
    """
    from tqdm.auto import tqdm

    workers = num_workers or min(os.cpu_count() or 1, 8)
    if num_workers is None and len(conversations) < _MIN_PER_WORKER * workers:
        workers = 1
    bar = tqdm(total=len(conversations), desc="tokenize", unit="conv", disable=not progress)
    if workers <= 1:
        encoder, out = get_encoder(tokenizer, template), []
        for chunk in _chunks(conversations, _CHUNK):
            out += _encode_all(encoder, chunk, mask)
            bar.update(len(chunk))
        bar.close()
        return out
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    out = []
    with multiprocessing.get_context(method).Pool(workers, _init_worker,
                                                  (pickle.dumps(tokenizer), template, mask)) as pool:
        for encoded in pool.imap(_encode_chunk, _chunks(conversations, _CHUNK)):
            out += encoded
            bar.update(len(encoded))
    bar.close()
    return out


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


# ---- building and caching -----------------------------------------------------------------------------
def _check_encoded(encoded: list, conversations: list, max_length: int, data_path) -> None:
    lengths = np.array([len(ids) for ids, _ in encoded], dtype=np.int64)
    too_long = np.flatnonzero(lengths > max_length)
    if too_long.size:
        examples = ", ".join(repr(conversations[i].id) for i in too_long[:5])
        raise ValueError(
            f"{data_path}: {too_long.size} of {len(encoded)} conversations encode to more than max_length="
            f"{max_length} tokens (longest {int(lengths.max())}; e.g. {examples}). Nothing is truncated silently: "
            f"split them first with `ds-vicuna data split {data_path} OUT --model M --template T "
            f"--max-length {max_length}`")
    if not any((labels != IGNORE_INDEX).any() for _, labels in encoded):
        raise ValueError(f"{data_path}: no sample has a trainable token (every label is {IGNORE_INDEX}); "
                         "check the mask strategy and that conversations contain assistant replies")


def _write(folder: Path, encoded: list, conv_ids: list[str], meta: dict) -> None:
    lengths = np.array([len(ids) for ids, _ in encoded], dtype=np.int64)
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    empty = np.zeros(0, dtype=np.int32)
    np.save(folder / "input_ids.npy", np.concatenate([ids for ids, _ in encoded]) if encoded else empty)
    np.save(folder / "labels.npy", np.concatenate([labels for _, labels in encoded]) if encoded else empty)
    np.save(folder / "offsets.npy", offsets)
    (folder / "conversation_ids.json").write_text(json.dumps(conv_ids))
    (folder / "meta.json").write_text(json.dumps(meta, indent=2))


def _build(folder: Path, data_path, tokenizer, template: str, max_length: int, mask: str, skip_bad: bool,
           num_workers: int | None, progress: bool) -> None:
    from collections import Counter

    from ds_vicuna.formats import load_conversations

    skips = Counter()
    conversations = load_conversations(data_path, skip_bad=skip_bad, skips=skips)
    encoded = encode_conversations(conversations, tokenizer, template, mask, num_workers, progress)
    _check_encoded(encoded, conversations, max_length, data_path)
    keep = [i for i, (_, labels) in enumerate(encoded) if (labels != IGNORE_INDEX).any()]
    if len(keep) < len(encoded):
        log.warning("%s: %d of %d conversations have no trainable token and are left out",
                    data_path, len(encoded) - len(keep), len(encoded))
    meta = {"encoding_version": ENCODING_VERSION, "data_path": str(data_path), "template": template,
            "max_length": max_length, "mask": mask, "num_samples": len(keep),
            "num_tokens": int(sum(len(encoded[i][0]) for i in keep)),
            "num_label_tokens": int(sum((encoded[i][1] != IGNORE_INDEX).sum() for i in keep)),
            "skipped": {"no_label_tokens": len(encoded) - len(keep), **{k.value: n for k, n in skips.items()}}}
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        _write(tmp, [encoded[i] for i in keep], [conversations[i].id for i in keep], meta)
        os.rename(tmp, folder)  # atomic: a folder that exists is complete
    except OSError:
        if not folder.is_dir():  # another process renaming the same key first is fine
            raise
    finally:
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
        data_path: ShareGPT/OpenAI JSON or JSONL (see `ds_vicuna.formats`).
        tokenizer: a fast Hugging Face tokenizer (with the template's special tokens added).
        template: template name.
        max_length: every sample must fit; longer ones are an error (run `ds-vicuna data split` first).
        mask: "assistant", "last_turn" or "all".
        cache_dir: where cache folders live (shared by all ranks).
        num_workers: encoding processes (None: one per core when the file is big enough).
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
