"""Batched generation: requests that wait together decode together in one left-padded batch.

    engine = BatchEngine(model, tokenizer, stop_token_ids=[...], max_batch_size=8)
    engine.run_batch([GenerationJob(...), ...])   # the worker's scheduler thread calls this in a loop

One `forward` per step serves every live row: the prompt batch is left-padded and prefilled once, then each step
feeds one token per row through the KV cache. Rows that finish (stop token, stop string, max_tokens, cancelled)
are cut out of the batch and its cache (`DynamicCache.batch_select_indices`), so the remaining rows do not pay for
them. Sampling is per row: its own temperature, top_p and seeded `torch.Generator`.

Text streams per row through `IncrementalText`, which only releases characters that are final: never half of a
multi-byte UTF-8 character and never a prefix of a stop string that may still complete.
"""
from __future__ import annotations

import enum
import queue
import threading
from dataclasses import dataclass, field
from typing import Sequence


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

    Events put on `events`: ("text", str) for each released piece, then exactly one
    ("done", {"finish_reason", "prompt_tokens", "completion_tokens"}) or ("error", message).
    """

    prompt_ids: list[int]
    params: SamplingParams
    events: "queue.Queue[tuple[str, object]]" = field(default_factory=queue.Queue)
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
    """Runs batches of GenerationJobs on one causal LM.

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

    def run_batch(self, jobs: Sequence[GenerationJob]) -> None:
        """Generate for every job until each finishes; events go to each job's queue. Never raises."""
        import torch

        rows = [self._new_row(job) for job in jobs]
        try:
            with torch.inference_mode():
                self._decode(rows)
        except Exception as err:  # one bad batch must not kill the worker; every waiting client is told
            for row in rows:
                row.job.events.put(("error", f"generation failed: {type(err).__name__}: {err}"))

    def _new_row(self, job: GenerationJob) -> _Row:
        import torch

        generator = torch.Generator()
        generator.manual_seed(job.params.seed if job.params.seed is not None else torch.seed())
        return _Row(job, IncrementalText(self.tokenizer, job.params.stop), generator)

    def _decode(self, rows: list[_Row]) -> None:
        import torch
        from transformers import DynamicCache

        longest = max(len(r.job.prompt_ids) for r in rows)
        input_ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)  # [B, T] left-padded
        attention = torch.zeros((len(rows), longest), dtype=torch.long)  # [B, T]
        for i, row in enumerate(rows):
            ids = row.job.prompt_ids
            input_ids[i, longest - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention[i, longest - len(ids):] = 1
        positions = (attention.cumsum(-1) - 1).clamp(min=0)  # [B, T]
        cache = DynamicCache(config=self.model.config)
        step_ids = input_ids
        while rows:
            out = self.model(input_ids=step_ids, attention_mask=attention, position_ids=positions,
                             past_key_values=cache, use_cache=True, logits_to_keep=1)
            logits = out.logits[:, -1, :].float()  # [B, V]
            next_ids = [self._sample(logits[i], row) for i, row in enumerate(rows)]
            keep = [i for i, (row, tok) in enumerate(zip(rows, next_ids)) if not self._advance(row, tok)]
            if len(keep) < len(rows):
                if not keep:
                    return
                index = torch.tensor(keep, dtype=torch.long)
                cache.batch_select_indices(index)
                rows = [rows[i] for i in keep]
                next_ids = [next_ids[i] for i in keep]
                attention, positions = attention[index], positions[index]
            step_ids = torch.tensor(next_ids, dtype=torch.long).unsqueeze(-1)  # [B, 1]
            attention = torch.cat([attention, attention.new_ones((len(rows), 1))], dim=-1)  # [B, T+1]
            positions = positions[:, -1:] + 1  # [B, 1]

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
            job.events.put(("text", piece))
        if hit_stop:
            return self._finish(row, FinishReason.STOP)
        if row.generated >= job.params.max_tokens:
            return self._finish(row, FinishReason.LENGTH)
        return False

    def _finish(self, row: _Row, reason: FinishReason) -> bool:
        rest = row.text.finish()  # text held back for a stop string that never completed
        if rest:
            row.job.events.put(("text", rest))
        row.job.events.put(("done", {"finish_reason": reason.value, "prompt_tokens": len(row.job.prompt_ids),
                                     "completion_tokens": row.generated}))
        return True
