"""Batched generation: requests that wait together decode together in one left-padded batch.

    engine = BatchEngine(model, tokenizer, stop_token_ids=[...], max_batch_size=8)
    engine.add(jobs); engine.step()   # the worker's scheduler thread: admit waiting jobs, decode one token
    engine.run_batch(jobs)            # or: run these jobs to completion

One `forward` per step serves every live row through the KV cache. New requests join between steps: they are
prefilled together as a left-padded mini-batch and their cache is merged into the running one. Rows that finish
(stop token, stop string, max_tokens, cancelled) are cut out of the batch and its cache
(`DynamicCache.batch_select_indices`), so the remaining rows do not pay for them. Sampling is per row: its own
temperature, top_p and seeded `torch.Generator`.

Text streams per row through `IncrementalText`, which only releases characters that are final: never half of a
multi-byte UTF-8 character and never a prefix of a stop string that may still complete.
"""
from __future__ import annotations

import enum
import queue
import threading
from dataclasses import dataclass, field
from typing import Sequence

from ds_vicuna.serve.protocol import DoneEvent, ErrorEvent, Event, TextEvent


class FinishReason(str, enum.Enum):
    STOP = "stop"  # a stop token or stop string
    LENGTH = "length"  # max_tokens reached
    CANCELLED = "cancelled"  # the client went away


@dataclass
class SamplingParams:
    """Per-request generation settings (already validated by `schemas`)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class GenerationJob:
    """One request inside the worker: its prompt ids, settings and the queue its events go to.

    Events put on `events` (`serve.protocol`): a `TextEvent` for each released piece, then exactly one
    `DoneEvent` or `ErrorEvent`.
    """

    prompt_ids: list[int]
    params: SamplingParams
    events: "queue.Queue[Event]" = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)


class IncrementalText:
    """Turns a growing list of token ids into final text pieces; finds stop strings across token boundaries."""

    def __init__(self, tokenizer, stop: Sequence[str]):
        self._tokenizer = tokenizer
        self._stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""  # decoded text of `ids`, up to a stop string once one is found
        self.emitted = 0  # characters of `text` already released

    def add(self, token_id: int) -> tuple[str, bool]:
        """Append one token; returns (newly final text, hit_stop_string)."""
        self.ids.append(token_id)
        self.text = self._tokenizer.decode(self.ids, skip_special_tokens=True)
        hit = self._find_stop()
        if hit is not None:
            self.text = self.text[:hit]
            return self._release(len(self.text)), True
        safe = len(self.text)
        while safe > self.emitted and self.text[safe - 1] == "\ufffd":  # an unfinished UTF-8 sequence
            safe -= 1
        safe -= self._partial_stop_suffix(self.text[:safe])
        return self._release(max(safe, self.emitted)), False

    def finish(self) -> str:
        """Release whatever is held back when generation ends for another reason."""
        return self._release(len(self.text))

    def _find_stop(self) -> int | None:
        longest = max((len(s) for s in self._stop), default=0)
        start = max(0, self.emitted - longest)
        hits = [i for i in (self.text.find(s, start) for s in self._stop) if i >= 0]
        return min(hits) if hits else None

    def _partial_stop_suffix(self, text: str) -> int:
        """Length of the longest end of `text` that begins some stop string."""
        best = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best

    def _release(self, upto: int) -> str:
        piece = self.text[self.emitted:upto]
        self.emitted = max(self.emitted, upto)
        return piece


@dataclass
class _Row:
    job: GenerationJob
    text: IncrementalText
    generator: "object"  # torch.Generator
    generated: int = 0


class BatchEngine:
    """Continuous batching on one causal LM: rows join between decode steps and leave when they finish.

    `add(jobs)` prefills new jobs as one left-padded mini-batch and merges their KV cache into the running batch
    (the shorter cache is left-padded with masked positions); `step()` decodes one token for every running row.
    Finished rows are cut out of the batch and its cache, and cache columns no row attends to are trimmed.

    Args:
        model: a Hugging Face causal LM in eval mode.
        tokenizer: its tokenizer (pad token needed; EOS is used when missing).
        stop_token_ids: ids that end a reply (template stop tokens and EOS); never shown to the client.
        max_batch_size: rows decoded together.
    """

    def __init__(self, model, tokenizer, stop_token_ids: Sequence[int], max_batch_size: int = 8):
        self.model = model
        self.tokenizer = tokenizer
        self.stop_token_ids = frozenset(int(i) for i in stop_token_ids)
        self.max_batch_size = max_batch_size
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad if pad is not None else 0)
        self._reset()

    def _reset(self) -> None:
        self.rows: list[_Row] = []
        self._cache = None  # DynamicCache of the running rows
        self._mask = None  # [B, T] 1 where a row attends
        self._next = None  # [B, 1] the token each row feeds next

    @property
    def active(self) -> int:
        return len(self.rows)

    @property
    def free_slots(self) -> int:
        return self.max_batch_size - len(self.rows)

    def run_batch(self, jobs: Sequence[GenerationJob]) -> None:
        """Generate for `jobs` (and any running rows) until all finish. Never raises."""
        self.add(jobs)
        while self.active:
            self.step()

    def add(self, jobs: Sequence[GenerationJob]) -> None:
        """Prefill new jobs and let them join the running batch. Never raises: a failure ends its jobs."""
        if not jobs:
            return
        import torch

        rows = [self._new_row(job) for job in jobs]
        try:
            with torch.inference_mode():
                self._prefill(rows)
        except Exception as err:  # one bad prompt batch must not kill the worker; its clients are told
            self._fail(rows, err)

    def step(self) -> None:
        """One decode step for every running row. Never raises: a failure ends every running job."""
        if not self.rows:
            return
        import torch

        try:
            with torch.inference_mode():
                self._decode_step()
        except Exception as err:
            rows = self.rows
            self._reset()
            self._fail(rows, err)

    def _fail(self, rows: list[_Row], err: Exception) -> None:
        for row in rows:
            row.job.events.put(ErrorEvent(f"generation failed: {type(err).__name__}: {err}"))

    def _new_row(self, job: GenerationJob) -> _Row:
        import torch

        generator = torch.Generator()
        generator.manual_seed(job.params.seed if job.params.seed is not None else torch.seed())
        return _Row(job, IncrementalText(self.tokenizer, job.params.stop), generator)

    def _prefill(self, rows: list[_Row]) -> None:
        import torch
        from transformers import DynamicCache

        longest = max(len(r.job.prompt_ids) for r in rows)
        input_ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)  # [b, T] left-padded
        mask = torch.zeros((len(rows), longest), dtype=torch.long)  # [b, T]
        for i, row in enumerate(rows):
            ids = row.job.prompt_ids
            input_ids[i, longest - len(ids):] = torch.tensor(ids, dtype=torch.long)
            mask[i, longest - len(ids):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [b, T]
        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                         use_cache=True, logits_to_keep=1)
        next_ids = self._sample_all(out.logits[:, -1, :].float(), rows)  # [b, 1]
        keep = self._advance_all(rows, next_ids)
        if not keep:
            return
        cache, mask, next_ids = _select(cache, mask, next_ids, keep)
        if self.rows:
            cache, mask = _merge(self._cache, self._mask, cache, mask)
            next_ids = torch.cat([self._next, next_ids], dim=0)
        self.rows = self.rows + [rows[i] for i in keep]
        self._cache, self._mask, self._next = cache, mask, next_ids

    def _decode_step(self) -> None:
        mask = torch_cat_ones(self._mask)  # [B, T+1]
        positions = mask.sum(-1, keepdim=True) - 1  # [B, 1] each row's own position
        out = self.model(input_ids=self._next, attention_mask=mask, position_ids=positions,
                         past_key_values=self._cache, use_cache=True, logits_to_keep=1)
        next_ids = self._sample_all(out.logits[:, -1, :].float(), self.rows)  # [B, 1]
        keep = self._advance_all(self.rows, next_ids)
        if not keep:
            self._reset()
            return
        if len(keep) < len(self.rows):
            self._cache, mask, next_ids = _select(self._cache, mask, next_ids, keep)
            self.rows = [self.rows[i] for i in keep]
        self._mask, self._next = mask, next_ids

    def _sample_all(self, logits, rows: list[_Row]):
        import torch

        return torch.tensor([[self._sample(logits[i], row)] for i, row in enumerate(rows)], dtype=torch.long)

    def _advance_all(self, rows: list[_Row], next_ids) -> list[int]:
        """Feed each row its sampled token; the indices of rows still running."""
        return [i for i, row in enumerate(rows) if not self._advance(row, int(next_ids[i, 0]))]

    def _sample(self, logits, row: _Row) -> int:
        """Greedy at temperature 0, else nucleus sampling with the row's own generator."""
        import torch

        params = row.job.params
        if params.temperature <= 0:
            return int(logits.argmax())
        probs = torch.softmax(logits / params.temperature, dim=-1)  # [V]
        if params.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            before = sorted_probs.cumsum(-1) - sorted_probs  # mass of strictly more likely tokens
            sorted_probs[before >= params.top_p] = 0.0  # the top token always survives (before == 0)
            return int(order[torch.multinomial(sorted_probs, 1, generator=row.generator)])
        return int(torch.multinomial(probs, 1, generator=row.generator))

    def _advance(self, row: _Row, token_id: int) -> bool:
        """Feed one sampled token to a row; returns True when the row is finished (its 'done' event sent)."""
        job = row.job
        if job.cancelled.is_set():
            return self._finish(row, FinishReason.CANCELLED)
        if token_id in self.stop_token_ids:
            return self._finish(row, FinishReason.STOP)
        row.generated += 1
        piece, hit_stop = row.text.add(token_id)
        if piece:
            job.events.put(TextEvent(piece))
        if hit_stop:
            return self._finish(row, FinishReason.STOP)
        if row.generated >= job.params.max_tokens:
            return self._finish(row, FinishReason.LENGTH)
        return False

    def _finish(self, row: _Row, reason: FinishReason) -> bool:
        rest = row.text.finish()  # text held back for a stop string that never completed
        if rest:
            row.job.events.put(TextEvent(rest))
        row.job.events.put(DoneEvent(reason.value, len(row.job.prompt_ids), row.generated))
        return True


def torch_cat_ones(mask):
    """`mask` [B, T] with a column of ones appended: [B, T+1]."""
    import torch

    return torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)


def _select(cache, mask, next_ids, keep: list[int]):
    """Keep rows `keep` of the cache, mask and next tokens; drop leading columns no remaining row attends to."""
    import torch

    index = torch.tensor(keep, dtype=torch.long)
    cache.batch_select_indices(index)
    mask, next_ids = mask[index], next_ids[index]
    first = int(mask.any(0).nonzero()[0, 0])  # the earliest position any remaining row attends to
    if first > 0:
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
        mask = mask[:, first:]
    return cache, mask, next_ids


def _merge(cache_a, mask_a, cache_b, mask_b):
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
