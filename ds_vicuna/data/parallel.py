"""Streaming helpers shared by the data stages: an ordered, bounded process map and a compact hash index.

    from ds_vicuna.data.parallel import HashSet, hash64, ordered_map
    for result in ordered_map(make_cleaner, (options,), records, workers=4):   # results in input order
        ...
    seen = HashSet()
    is_new = seen.add(hash64(text))

`ordered_map` keeps the output independent of the number of workers (results come back in input order) and its
memory independent of the input size (at most `window` chunks are in flight, the input is read lazily).
`HashSet` remembers millions of 64-bit hashes in 8-16 bytes each (one numpy array), where a Python set of
strings or ints costs 60-100 bytes an entry.
"""
from __future__ import annotations

import hashlib
import multiprocessing
import os
from collections import deque
from typing import Any, Callable, Iterable, Iterator

import numpy as np

# Per worker process, set once by the pool initializer: {"fn": the callable `make_worker(*args)` returned}.
_worker_state: dict = {}


def _init_worker(make_worker: Callable, args: tuple) -> None:
    _worker_state["fn"] = make_worker(*args)


def _run_chunk(chunk: list) -> list:
    fn = _worker_state["fn"]
    return [fn(item) for item in chunk]


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def ordered_map(make_worker: Callable[..., Callable[[Any], Any]], args: tuple, items: Iterable, workers: int,
                chunk_size: int = 64, context: str = "spawn", window: int | None = None) -> Iterator:
    """Yield `make_worker(*args)(item)` for every item, in input order, computed in `workers` processes.

    Args:
        make_worker: a picklable, module-level factory; each process calls it once (e.g. to build a tokenizer's
            encoder) and then applies what it returns to every item it gets.
        args: its arguments (pickled once per worker with "spawn", inherited with "fork").
        items: read lazily, `chunk_size` at a time.
        workers: processes; 1 (or less) runs everything in this process, with no pool at all.
        chunk_size: items per task.
        context: multiprocessing start method ("fork" is used only where the platform has it).
        window: chunks in flight at most (default 4 per worker): bounds memory whatever the input size.

    Raises:
        Whatever the worker raised, for the first item (in input order) that failed.
    """
    if workers <= 1:
        fn = make_worker(*args)
        for item in items:
            yield fn(item)
        return
    if context not in multiprocessing.get_all_start_methods():
        context = "spawn"
    if context == "fork":  # a forked Rust tokenizer must not use its thread pool (HF tokenizers would warn)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    window = window or 4 * workers
    pending: deque = deque()
    with multiprocessing.get_context(context).Pool(workers, _init_worker, (make_worker, args)) as pool:
        for chunk in _chunks(items, chunk_size):
            pending.append(pool.apply_async(_run_chunk, (chunk,)))
            if len(pending) >= window:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


def hash64(text: str) -> int:
    """A 64-bit hash of a string (blake2b), the same in every process and run (unlike `hash()`)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


class HashSet:
    """A set of 64-bit keys: open addressing with linear probing in one numpy array (8 bytes a slot, at most half
    full), where a Python set of ints or strings costs 60-100 bytes an entry.

    Used to find duplicates among millions of records in bounded memory. Keys are hashes (`hash64`): two
    different records collide with probability about n^2 / 2^65 (3e-8 for a million records).
    """

    def __init__(self, capacity: int = 1 << 12):
        self._keys = np.zeros(1 << max(4, (capacity - 1).bit_length()), dtype=np.uint64)
        self._count = 0

    def __len__(self) -> int:
        return self._count

    @staticmethod
    def _key(key: int) -> int:
        return (key & 0xFFFFFFFFFFFFFFFF) or 1  # 0 marks an empty slot

    def _slot(self, key: int) -> int:
        keys = self._keys
        mask = len(keys) - 1
        slot = key & mask
        while True:
            found = int(keys[slot])
            if found == 0 or found == key:
                return slot
            slot = (slot + 1) & mask

    def add(self, key: int) -> bool:
        """Add a key; True when it was new, False when it was there already."""
        key = self._key(key)
        slot = self._slot(key)
        if self._keys[slot]:
            return False
        self._keys[slot] = key
        self._count += 1
        if 2 * self._count > len(self._keys):
            old = self._keys[self._keys != 0]
            self._keys = np.zeros(2 * len(self._keys), dtype=np.uint64)
            for k in old.tolist():
                self._keys[self._slot(k)] = k
        return True

    def __contains__(self, key: int) -> bool:
        return bool(self._keys[self._slot(self._key(key))])
