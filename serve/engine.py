"""Batched generation: continuous batching with chunked prefill on one causal LM.

    engine = BatchEngine(model, tokenizer, stop_token_ids=[...], max_batch_size=8, prefill_chunk=256)
    engine.add(jobs); engine.step()   # the worker's scheduler thread: queue new jobs, run one step
    engine.run_batch(jobs)            # or: run these jobs to completion (`serve.generate` does, for eval)

One `step()` is one decode step for every running row, then at most `prefill_chunk` prompt tokens of the jobs
waiting to join. A long prompt is prefilled in chunks across several steps, so running streams keep getting a
token per step while it loads; short prompts that arrive together are prefilled together as one left-padded
mini-batch. When a prompt is fully prefilled its first token is sampled and its KV cache is merged into the
running one (the shorter cache is left-padded with masked positions). Rows that finish (stop token, stop string,
max_tokens, cancelled) are cut out of the batch and its cache, so the remaining rows do not pay for them.

Every tensor and random generator lives on the model's device (inputs on the input embeddings' device, sampling
on the output head's device, for a model spread over GPUs too). Sampling is per row: its own temperature, top_p
and seeded `torch.Generator`. Logprobs are of the raw distribution (log_softmax of the logits, before
temperature and top_p), as vLLM and OpenAI report them.

No job can hurt another: a bad job (e.g. a seed torch rejects) or a row whose sampling fails gets its own
`ErrorEvent`; a failed prefill of several prompts is retried one prompt at a time; a failed decode step (whose
cache may be half-written) sends the running rows back to be prefilled again from their prompt plus the tokens
generated so far, and they continue where they were (seeded sampling included). Nothing here raises.

Text streams per row through `serve.detokenizer.IncrementalText`, which decodes only a few tokens per step and
only releases characters that are final: never half of a multi-byte UTF-8 character and never a prefix of a stop
string that may still complete. The cache surgery (cutting rows out, stacking batches) is `serve.kv_cache`.
"""
from __future__ import annotations

import collections
import dataclasses
import enum
import inspect
import logging
import math
import secrets
from dataclasses import dataclass, field
from typing import Any, Sequence

from ds_vicuna.serve.detokenizer import IncrementalText
from ds_vicuna.serve.errors import APIError, ErrorCode
from ds_vicuna.serve.jobs import GenerationJob
from ds_vicuna.serve.kv_cache import append_ones, select_rows, stack_batches
from ds_vicuna.serve.worker_events import DoneEvent, ErrorEvent, TextEvent, TokenLogprob

log = logging.getLogger(__name__)

DEFAULT_PREFILL_CHUNK = {"cpu": 256, "cuda": 2048}  # prompt tokens per step; a CPU step must stay short
MAX_RECOMPUTES = 3  # times a row may be re-prefilled after failed decode steps before it is failed
_LOGPROB_BLOCK = 128  # prompt positions per log_softmax when scoring a prompt (bounds the [n, vocab] buffer)


class FinishReason(str, enum.Enum):
    STOP = "stop"  # a stop token or stop string
    LENGTH = "length"  # max_tokens reached
    CANCELLED = "cancelled"  # the client went away


@dataclass(eq=False)
class _Row:
    job: GenerationJob
    text: IncrementalText
    generator: Any  # torch.Generator on the sampling device
    generated: int = 0  # completion tokens so far (a stop token is not one)
    tokens: list[int] = field(default_factory=list)  # sampled ids fed back: the context is prompt + tokens
    pending: list[TokenLogprob] = field(default_factory=list)  # logprobs not yet sent with a text event
    sent: int = 0  # generated tokens already counted in a text event
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    recomputes: int = 0
    finished: bool = False
    adapter: int = 0  # index in the engine's AdapterRouting (0: the base)

    @property
    def context(self) -> list[int]:
        return self.job.prompt_ids + self.tokens

    @property
    def scores_prompt(self) -> bool:
        """Still has prompt positions to score (echo + logprobs)."""
        return self.job.params.wants_prompt_logprobs and len(self.prompt_logprobs) < len(self.job.prompt_ids)


@dataclass(eq=False)
class _Prefill:
    """Rows being prefilled together: their left-padded contexts and the cache built so far."""

    rows: list[_Row]
    input_ids: Any  # [b, T] left-padded
    mask: Any  # [b, T] 1 on real tokens
    positions: Any  # [b, T]
    cache: Any
    done: int = 0  # columns prefilled so far

    @property
    def width(self) -> int:
        return int(self.input_ids.shape[1])


class BatchEngine:
    """Continuous batching with chunked prefill on one causal LM (see the module docstring).

    Args:
        model: a Hugging Face causal LM in eval mode, on one device or spread over several (device_map).
        tokenizer: its tokenizer (pad token needed; EOS is used when missing).
        stop_token_ids: ids that end a reply (template stop tokens and EOS); never shown to the client.
        max_batch_size: rows decoded together (running plus being prefilled).
        prefill_chunk: prompt tokens prefilled per step; None picks by device (CPU 256, CUDA 2048); 0 prefills
            each prompt batch in one piece.
        routing: the `serve.multi_lora.AdapterRouting` of a model serving LoRA adapters: each row's adapter
            (`GenerationJob.adapter`) is set before every forward, so rows of different adapters share batches.
    """

    def __init__(self, model, tokenizer, stop_token_ids: Sequence[int], max_batch_size: int = 8,
                 prefill_chunk: int | None = None, routing=None):
        self.model = model
        self.routing = routing
        self.tokenizer = tokenizer
        self.stop_token_ids = frozenset(int(i) for i in stop_token_ids)
        self.max_batch_size = max_batch_size
        self.device = model.get_input_embeddings().weight.device
        output = model.get_output_embeddings()
        self.sample_device = output.weight.device if output is not None else self.device
        self.prefill_chunk = DEFAULT_PREFILL_CHUNK.get(self.device.type, 2048) if prefill_chunk is None \
            else int(prefill_chunk)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad if pad is not None else 0)
        self._token_texts: dict[int, str] = {}
        # transformers 5.x calls the KV cache argument `cache` (`past_key_values` is deprecated); 4.x knows only that
        self._cache_arg = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
        self._prefilling: "collections.deque[_Prefill]" = collections.deque()
        self._reset()

    def _reset(self) -> None:
        self.rows: list[_Row] = []
        self._cache = None  # DynamicCache of the running rows
        self._mask = None  # [B, T] 1 where a row attends
        self._next = None  # [B, 1] the token each row feeds next

    @property
    def active(self) -> int:
        """Rows running or being prefilled."""
        return len(self.rows) + sum(len(group.rows) for group in self._prefilling)

    @property
    def free_slots(self) -> int:
        return self.max_batch_size - self.active

    @property
    def prefilling(self) -> int:
        """Rows still being prefilled."""
        return sum(len(group.rows) for group in self._prefilling)

    def run_batch(self, jobs: Sequence[GenerationJob]) -> None:
        """Generate for `jobs` (and any running rows) until all finish. Never raises."""
        self.add(jobs)
        while self.active:
            self.step()

    def add(self, jobs: Sequence[GenerationJob]) -> None:
        """Queue new jobs to be prefilled by the next steps. Never raises: a bad job gets its ErrorEvent."""
        rows = []
        for job in jobs:
            try:
                rows.append(self._new_row(job))
            except APIError as err:  # a bad job is its client's error, never the worker's
                job.events.put(ErrorEvent(err.message, err.code.value))
            except Exception as err:
                code = ErrorCode.INVALID_VALUE if isinstance(err, ValueError) else ErrorCode.WORKER_FAILED
                job.events.put(ErrorEvent(f"{err}", code.value))
        self._queue_prefill(rows)

    def step(self) -> None:
        """One decode step for every running row, then up to `prefill_chunk` prompt tokens. Never raises."""
        if self.rows:
            self._guarded_decode()
        if self._prefilling:
            self._prefill_some()

    def abort(self, message: str) -> None:
        """End every running and waiting row with an ErrorEvent (the worker is going away)."""
        rows = self.rows + [row for group in self._prefilling for row in group.rows]
        self._prefilling.clear()
        self._reset()
        self._fail(rows, message)

    # ---- rows -----------------------------------------------------------------------------------------
    def _new_row(self, job: GenerationJob) -> _Row:
        import torch

        job.params.validate()  # a job built in code has not been through a request's check
        if job.params.max_tokens is None:
            raise ValueError("'max_tokens' must be set before a job reaches the engine")
        if not job.prompt_ids:
            raise ValueError("the prompt is empty")
        adapter = 0
        if job.adapter:
            if self.routing is None or job.adapter not in self.routing.names:
                raise ValueError(f"this worker serves no adapter named {job.adapter!r}")
            adapter = self.routing.index(job.adapter)
        generator = torch.Generator(device=self.sample_device)
        generator.manual_seed(job.params.seed if job.params.seed is not None else secrets.randbits(63))
        row = _Row(job, IncrementalText(self.tokenizer, job.params.stop, job.prompt_ids, job.reply_lead), generator,
                   adapter=adapter)
        if job.params.wants_prompt_logprobs:
            row.prompt_logprobs.append(TokenLogprob(self._token_text(job.prompt_ids[0]), None))
        return row

    def _fail(self, rows: list[_Row], message: str, code: ErrorCode = ErrorCode.WORKER_FAILED) -> None:
        for row in rows:
            if not row.finished:
                row.finished = True
                row.job.events.put(ErrorEvent(message, code.value))

    def _token_text(self, token_id: int) -> str:
        """A token's text decoded alone (OpenAI's `token` field), cached per id."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False,
                                                                        clean_up_tokenization_spaces=False)
        return text

    # ---- prefill --------------------------------------------------------------------------------------
    def _queue_prefill(self, rows: list[_Row], front: bool = False) -> None:
        """Short contexts prefill together; a long one prefills alone, in chunks.

        A group that scores a prompt keeps the logits of every position, at most `prefill_chunk` of them per step;
        without chunking a scored prompt prefills alone, so that buffer stays one prompt long.
        """
        for row in rows:
            if row.scores_prompt:
                del row.prompt_logprobs[1:]  # a retried row scores its prompt again from the start
        alone = [r for r in rows if len(r.context) > self.prefill_chunk > 0 or
                 (r.scores_prompt and not self.prefill_chunk)]
        together = [r for r in rows if r not in alone]
        groups = ([self._group(together)] if together else []) + [self._group([r]) for r in alone]
        if front:
            self._prefilling.extendleft(reversed(groups))
        else:
            self._prefilling.extend(groups)

    def _group(self, rows: list[_Row]) -> _Prefill:
        import torch
        from transformers import DynamicCache

        width = max(len(row.context) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long, device=self.device)  # [b, T]
        mask = torch.zeros((len(rows), width), dtype=torch.long, device=self.device)  # [b, T]
        for i, row in enumerate(rows):
            context = row.context
            input_ids[i, width - len(context):] = torch.tensor(context, dtype=torch.long, device=self.device)
            mask[i, width - len(context):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [b, T]
        return _Prefill(rows, input_ids, mask, positions, DynamicCache(config=self.model.config))

    def _prefill_some(self) -> None:
        """Spend one step's prefill budget on the waiting groups, oldest first."""
        import torch

        budget = self.prefill_chunk or math.inf
        while self._prefilling and budget > 0:
            group = self._prefilling[0]
            if all(row.job.cancelled.is_set() for row in group.rows):
                self._prefilling.popleft()
                for row in group.rows:
                    self._finish(row, FinishReason.CANCELLED)
                continue
            left = group.width - group.done
            columns = left if budget == math.inf else int(max(1, min(left, budget // len(group.rows))))
            budget -= columns * len(group.rows)
            try:
                with torch.inference_mode():
                    last_logits = self._prefill_chunk(group, columns)
            except Exception as err:
                self._prefilling.popleft()
                self._prefill_failed(group, err)
                continue
            if last_logits is not None:
                self._prefilling.popleft()
                self._join(group, last_logits)

    def _prefill_chunk(self, group: _Prefill, columns: int):
        """Prefill the next `columns` positions of a group; its last logits [b, V] once the group is done."""
        start, end = group.done, group.done + columns
        scoring = [i for i, row in enumerate(group.rows) if row.scores_prompt]
        self._route(group.rows)
        out = self.model(input_ids=group.input_ids[:, start:end], attention_mask=group.mask[:, :end],
                         position_ids=group.positions[:, start:end], use_cache=True,
                         logits_to_keep=0 if scoring else 1, **{self._cache_arg: group.cache})
        for i in scoring:
            self._score_prompt(group, i, out.logits[i], start, end)  # [columns, V]
        group.done = end
        return out.logits[:, -1, :] if end == group.width else None

    def _score_prompt(self, group: _Prefill, i: int, logits, start: int, end: int) -> None:
        """Logprobs of the prompt tokens that logits at columns [start, end) of row i predict."""
        import torch

        row = group.rows[i]
        prompt = row.job.prompt_ids
        pad = group.width - len(row.context)
        first, last = max(start, pad), min(end, pad + len(prompt) - 1)  # column c predicts prompt[c - pad + 1]
        for block in range(first, last, _LOGPROB_BLOCK):
            stop = min(block + _LOGPROB_BLOCK, last)
            targets = prompt[block - pad + 1:stop - pad + 1]
            logprobs = torch.log_softmax(logits[block - start:stop - start].float(), dim=-1)  # [n, V]
            index = torch.tensor(targets, device=logprobs.device).unsqueeze(-1)  # [n, 1]
            row.prompt_logprobs += self._entries(logprobs, index, row.job.params.top_logprobs, targets)

    def _entries(self, logprobs, index, top: int, token_ids: list[int]) -> list[TokenLogprob]:
        """TokenLogprob per row of `logprobs` [n, V] for the tokens `index` [n, 1], with `top` alternatives."""
        chosen = logprobs.gather(-1, index).squeeze(-1).tolist()  # [n]
        if top:
            values, ids = logprobs.topk(top, dim=-1)  # [n, top]
            tops = [tuple(zip(map(self._token_text, i), v)) for i, v in zip(ids.tolist(), values.tolist())]
        else:
            tops = [()] * len(chosen)
        return [TokenLogprob(self._token_text(t), c, alt) for t, c, alt in zip(token_ids, chosen, tops)]

    def _prefill_failed(self, group: _Prefill, err: Exception) -> None:
        """Retry a failed group's rows one at a time; a row that fails alone gets its ErrorEvent."""
        live = [row for row in group.rows if not row.finished]
        if len(live) > 1:
            log.warning("prefill of %d prompts failed (%s: %s); retrying them one at a time", len(live),
                        type(err).__name__, err)
            for row in reversed(live):
                self._queue_prefill([row], front=True)
            return
        log.warning("prefill failed for one job: %s: %s", type(err).__name__, err)
        self._fail(live, f"generation failed: {type(err).__name__}: {err}")

    def _join(self, group: _Prefill, last_logits) -> None:
        """Sample each prefilled row's next token and merge the rows that go on into the running batch."""
        import torch

        keep, next_ids = self._advance_all(group.rows, last_logits)
        if not keep:
            return
        try:
            with torch.inference_mode():
                cache, mask, next_ids = select_rows(group.cache, group.mask, next_ids, keep)
                rows = [group.rows[i] for i in keep]
                if self.rows:
                    cache, mask = stack_batches(self._cache, self._mask, cache, mask)
                    next_ids = torch.cat([self._next, next_ids], dim=0)
                    rows = self.rows + rows
        except Exception as err:  # the running cache may be half-merged: rebuild every row's cache
            self._recompute(self.rows + [group.rows[i] for i in keep], err)
            return
        self.rows, self._cache, self._mask, self._next = rows, cache, mask, next_ids

    # ---- decode ---------------------------------------------------------------------------------------
    def _guarded_decode(self) -> None:
        import torch

        try:
            with torch.inference_mode():
                self._decode_step()
        except Exception as err:
            self._recompute(self.rows, err)

    def _decode_step(self) -> None:
        mask = append_ones(self._mask)  # [B, T+1]
        positions = mask.sum(-1, keepdim=True) - 1  # [B, 1] each row's own position
        self._route(self.rows)
        out = self.model(input_ids=self._next, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1, **{self._cache_arg: self._cache})
        keep, next_ids = self._advance_all(self.rows, out.logits[:, -1, :])
        if not keep:
            self._reset()
            return
        if len(keep) < len(self.rows):
            self._cache, mask, next_ids = select_rows(self._cache, mask, next_ids, keep)
            self.rows = [self.rows[i] for i in keep]
        self._mask, self._next = mask, next_ids

    def _route(self, rows: list[_Row]) -> None:
        """Tell the LoRA layers which adapter each row of the next forward uses (rows in batch order)."""
        if self.routing is not None:
            self.routing.set_rows([row.adapter for row in rows])

    def _recompute(self, rows: list[_Row], err: Exception) -> None:
        """The running cache is lost: prefill the unfinished rows again from prompt + generated tokens."""
        self._reset()
        live = [row for row in rows if not row.finished]
        log.warning("a batch step failed (%s: %s); re-prefilling %d running rows", type(err).__name__, err, len(live))
        again = []
        for row in live:
            row.recomputes += 1
            if row.recomputes > MAX_RECOMPUTES:
                self._fail([row], f"generation failed: {type(err).__name__}: {err}")
            else:
                again.append(row)
        self._queue_prefill(again, front=True)

    # ---- sampling and streaming -----------------------------------------------------------------------
    def _advance_all(self, rows: list[_Row], logits) -> tuple[list[int], Any]:
        """Sample and feed each row's next token; (indices of rows still running, their next ids [k, 1])."""
        import torch

        logits = logits.float()  # [b, V]
        choices: list = logits.argmax(-1).tolist()  # greedy for all, then sampled rows replace theirs
        for i, row in enumerate(rows):
            params = row.job.params
            if params.max_tokens == 0 and not row.tokens:
                choices[i] = None  # prefill only (prompt scoring)
            elif not params.greedy:
                try:
                    choices[i] = self._sample(logits[i], row)
                except Exception as err:
                    choices[i] = err
        entries = self._generated_logprobs(rows, logits, choices)
        keep = []
        for i, row in enumerate(rows):
            try:
                if isinstance(choices[i], Exception):
                    raise choices[i]
                if choices[i] is None:
                    self._finish(row, FinishReason.LENGTH)
                elif not self._advance(row, choices[i], entries.get(i)):
                    keep.append(i)
            except Exception as err:  # this row's sampling or text failed; the others go on
                self._fail([row], f"generation failed: {type(err).__name__}: {err}")
        next_ids = torch.tensor([[choices[i]] for i in keep], dtype=torch.long, device=self.device)  # [k, 1]
        return keep, next_ids

    def _generated_logprobs(self, rows: list[_Row], logits, choices: list) -> dict[int, TokenLogprob]:
        """Raw-distribution logprobs of the chosen tokens, for the rows that asked."""
        import torch

        wanted = [i for i, row in enumerate(rows) if row.job.params.logprobs and isinstance(choices[i], int)
                  and not isinstance(choices[i], bool)]
        if not wanted:
            return {}
        logprobs = torch.log_softmax(logits[wanted], dim=-1)  # [w, V]
        index = torch.tensor([[choices[i]] for i in wanted], device=logprobs.device)  # [w, 1]
        top = max(rows[i].job.params.top_logprobs for i in wanted)
        entries = self._entries(logprobs, index, top, [choices[i] for i in wanted])
        return {i: dataclasses.replace(e, top=e.top[:rows[i].job.params.top_logprobs])
                for i, e in zip(wanted, entries)}

    def _sample(self, logits, row: _Row) -> int:
        """Nucleus sampling at the row's temperature with the row's own generator (on the logits' device)."""
        import torch

        params = row.job.params
        probs = torch.softmax(logits / params.temperature, dim=-1)  # [V]
        if params.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            before = sorted_probs.cumsum(-1) - sorted_probs  # mass of strictly more likely tokens
            sorted_probs[before >= params.top_p] = 0.0  # the top token always survives (before == 0)
            return int(order[torch.multinomial(sorted_probs, 1, generator=row.generator)])
        return int(torch.multinomial(probs, 1, generator=row.generator))

    def _advance(self, row: _Row, token_id: int, logprob: TokenLogprob | None) -> bool:
        """Feed one sampled token to a row; returns True when the row is finished (its 'done' event sent)."""
        job = row.job
        if job.cancelled.is_set():
            return self._finish(row, FinishReason.CANCELLED)
        if token_id in self.stop_token_ids:
            if logprob is not None and job.params.echo:
                # Prompt scoring (echo + logprobs, e.g. lm-evaluation-harness: max_tokens=1, reads the entries
                # after the prompt) needs the sampled token's entry even when it is a stop token; its text is
                # never part of the reply.
                row.pending.append(logprob)
            return self._finish(row, FinishReason.STOP)
        row.generated += 1
        row.tokens.append(token_id)
        if logprob is not None:
            row.pending.append(logprob)
        piece, hit_stop = row.text.add(token_id)
        if piece:
            job.events.put(TextEvent(piece, tuple(row.pending), row.generated - row.sent))
            row.pending.clear()
            row.sent = row.generated
        if hit_stop:
            return self._finish(row, FinishReason.STOP)
        if row.generated >= job.params.max_tokens:
            return self._finish(row, FinishReason.LENGTH)
        return False

    def _finish(self, row: _Row, reason: FinishReason) -> bool:
        rest = row.text.finish()  # text held back for a stop string that never completed
        if rest:
            row.job.events.put(TextEvent(rest, tuple(row.pending), row.generated - row.sent))
            row.pending.clear()
            row.sent = row.generated
        prompt_logprobs = tuple(row.prompt_logprobs) if row.job.params.wants_prompt_logprobs else ()
        row.job.events.put(DoneEvent(reason.value, len(row.job.prompt_ids), row.generated, tuple(row.pending),
                                     prompt_logprobs))
        row.finished = True
        return True


