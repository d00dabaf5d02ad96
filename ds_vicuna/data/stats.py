"""Data statistics: how many conversations, turns and characters; token lengths under a template; mix shares.

    ds-vicuna data stats clean.jsonl
    ds-vicuna data stats split.jsonl --model embedded --template vicuna_v1.1
    ds-vicuna data stats sharegpt.jsonl identity.jsonl --weights 1 3 --model embedded   # each source's share
    ds-vicuna data stats --config configs/mix.yaml                                        # data.train_path's mix

Files are streamed (token lengths are kept as a histogram), so memory does not grow with the data. For a mix,
each source's share is of what one epoch trains on: its tokens (characters without --model) times its weight.
"""
from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from ds_vicuna.data.formats import Conversation, ConversationReader
from ds_vicuna.chat.messages import Role
from ds_vicuna.data.parallel import ordered_map

PERCENTILES = (50, 90, 99)


def percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile of an ascending list (an actual value of the list, no interpolation)."""
    if not sorted_values:
        raise ValueError("percentile of an empty list")
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def percentile_of_counts(counts: Counter, q: float) -> int:
    """`percentile` of the values a `{value: how many}` histogram holds, without expanding it."""
    total = sum(counts.values())
    if not total:
        raise ValueError("percentile of an empty histogram")
    rank, seen = max(1, math.ceil(q / 100 * total)), 0
    for value in sorted(counts):
        seen += counts[value]
        if seen >= rank:
            return value
    raise AssertionError("unreachable")


@dataclass
class DataStats:
    """Counts over a conversation file; `token_lengths` (a histogram) only when a tokenizer was given."""

    conversations: int = 0
    turns: Counter = field(default_factory=Counter)  # Role -> count
    chars: Counter = field(default_factory=Counter)  # Role -> characters
    token_lengths: Counter = field(default_factory=Counter)  # tokens of one conversation -> how many

    def add(self, conv: Conversation, tokens: int | None = None) -> None:
        self.conversations += 1
        for m in conv.messages:
            self.turns[m.role] += 1
            self.chars[m.role] += len(m.content)
        if tokens is not None:
            self.token_lengths[tokens] += 1

    @property
    def total_tokens(self) -> int:
        return sum(length * n for length, n in self.token_lengths.items())

    def as_dict(self) -> dict:
        out = {"conversations": self.conversations,
               "turns": {r.value: self.turns[r] for r in Role}, "chars": {r.value: self.chars[r] for r in Role}}
        if self.token_lengths:
            total = self.total_tokens
            out["tokens"] = {**{f"p{q}": percentile_of_counts(self.token_lengths, q) for q in PERCENTILES},
                             "max": max(self.token_lengths), "mean": round(total / self.conversations, 1),
                             "total": total}
        return out

    def table(self) -> str:
        d = self.as_dict()
        lines = [f"  conversations  {self.conversations:>10}",
                 f"  turns          {sum(self.turns.values()):>10}  " +
                 "  ".join(f"{r}={n}" for r, n in d["turns"].items()),
                 f"  chars          {sum(self.chars.values()):>10}  " +
                 "  ".join(f"{r}={n}" for r, n in d["chars"].items())]
        if "tokens" in d:
            lines.append("  tokens         " + "  ".join(f"{k}={v}" for k, v in d["tokens"].items()))
        return "\n".join(lines)


@dataclass
class MixStats:
    """Statistics of each source of a weighted mix and its share of one epoch."""

    paths: list[str]
    weights: list[float]
    stats: list[DataStats]

    @property
    def measure(self) -> str:
        """What the shares are of: tokens when every source was tokenized, else characters."""
        return "tokens" if all(s.token_lengths for s in self.stats) else "chars"

    def shares(self) -> list[float]:
        amounts = [s.total_tokens if self.measure == "tokens" else sum(s.chars.values()) for s in self.stats]
        weighted = [w * a for w, a in zip(self.weights, amounts)]
        total = sum(weighted) or 1
        return [x / total for x in weighted]

    def as_dict(self) -> dict:
        if len(self.stats) == 1 and self.weights[0] == 1:
            return self.stats[0].as_dict()
        return {"share_of": f"{self.measure} per epoch (weight x {self.measure})",
                "sources": [{"path": p, "weight": w, "share": round(share, 4), **s.as_dict()}
                            for p, w, s, share in zip(self.paths, self.weights, self.stats, self.shares())]}

    def table(self) -> str:
        if len(self.stats) == 1 and self.weights[0] == 1:
            return f"stats: {self.paths[0]}\n{self.stats[0].table()}"
        blocks = [f"mix: share of the {self.measure} one epoch trains on (weight x {self.measure})"]
        for path, weight, share in zip(self.paths, self.weights, self.shares()):
            blocks.append(f"  {share:>7.1%}  weight {weight:g}  {path}")
        for path, weight, stats in zip(self.paths, self.weights, self.stats):
            blocks.append(f"stats: {path} (weight {weight:g})\n{stats.table()}")
        return "\n".join(blocks)


def compute_stats(convs: Iterable[Conversation], encoder=None) -> DataStats:
    """Count conversations, turns and characters per role; token lengths when `encoder` is given.

    Args:
        convs: the conversations (any iterable; consumed once).
        encoder: a `ds_vicuna.chat.encoding.ConversationEncoder`; its `.encode` measures each conversation.
    """
    stats = DataStats()
    for conv in convs:
        stats.add(conv, len(encoder.encode(conv.messages)["input_ids"]) if encoder is not None else None)
    return stats


class _Measure:
    """What a worker process runs: a conversation -> (it, its token count under the template, or None)."""

    def __init__(self, tokenizer, template: str):
        from ds_vicuna.chat.encoding import get_encoder

        self.encoder = get_encoder(tokenizer, template) if tokenizer is not None else None

    def __call__(self, conv: Conversation) -> tuple[Conversation, int | None]:
        if self.encoder is None:
            return conv, None
        return conv, self.encoder.count_tokens(conv.messages)


def stats_file(source: str | os.PathLike, model: str | None = None, template: str = "vicuna_v1.1",
               skip_bad: bool = False, tokenizer=None, workers: int = 1) -> DataStats:
    """Statistics of a conversation file, streamed; token lengths when `model` (a folder or `embedded`) is given.

    Args:
        tokenizer: an already loaded tokenizer (with the template's tokens) instead of `model`.
        workers: processes measuring token lengths (the output does not depend on it).
    """
    if tokenizer is None and model is not None:
        from ds_vicuna.model.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(model, template)
    stats = DataStats()
    reader = ConversationReader(source, skip_bad=skip_bad)
    measured = ordered_map(_Measure, (tokenizer, template), reader, workers if tokenizer is not None else 1,
                           chunk_size=64, context="fork")
    for conv, tokens in measured:
        stats.add(conv, tokens)
    return stats


def stats_mix(sources: Sequence[tuple[str, float]], model: str | None = None, template: str = "vicuna_v1.1",
              skip_bad: bool = False, workers: int = 1) -> MixStats:
    """Statistics of each `(path, weight)` source and its share of an epoch (see `MixStats`)."""
    tokenizer = None
    if model is not None:
        from ds_vicuna.model.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(model, template)
    stats = [stats_file(path, template=template, skip_bad=skip_bad, tokenizer=tokenizer, workers=workers)
             for path, _ in sources]
    return MixStats([str(p) for p, _ in sources], [float(w) for _, w in sources], stats)
