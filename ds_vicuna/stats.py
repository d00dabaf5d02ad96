"""Data statistics: how many conversations, turns and characters; token lengths under a template.

    ds-vicuna data stats clean.jsonl
    ds-vicuna data stats split.jsonl --model embedded --template vicuna_v1.1
"""
from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, field

from ds_vicuna.formats import Conversation, load_conversations
from ds_vicuna.messages import Role

PERCENTILES = (50, 90, 99)


def percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile of an ascending list (an actual value of the list, no interpolation)."""
    if not sorted_values:
        raise ValueError("percentile of an empty list")
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


@dataclass
class DataStats:
    """Counts over a conversation file; `token_lengths` only when a tokenizer was given."""

    conversations: int = 0
    turns: Counter = field(default_factory=Counter)  # Role -> count
    chars: Counter = field(default_factory=Counter)  # Role -> characters
    token_lengths: list[int] = field(default_factory=list)

    def as_dict(self) -> dict:
        out = {"conversations": self.conversations,
               "turns": {r.value: self.turns[r] for r in Role}, "chars": {r.value: self.chars[r] for r in Role}}
        if self.token_lengths:
            lengths = sorted(self.token_lengths)
            out["tokens"] = {**{f"p{q}": percentile(lengths, q) for q in PERCENTILES}, "max": lengths[-1],
                             "mean": round(sum(lengths) / len(lengths), 1), "total": sum(lengths)}
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


def compute_stats(convs: list[Conversation], encoder=None) -> DataStats:
    """Count conversations, turns and characters per role; token lengths when `encoder` is given.

    Args:
        convs: the conversations.
        encoder: a `ds_vicuna.encoding.ConversationEncoder`; its `.encode` measures each conversation.
    """
    stats = DataStats(conversations=len(convs))
    for conv in convs:
        for m in conv.messages:
            stats.turns[m.role] += 1
            stats.chars[m.role] += len(m.content)
        if encoder is not None:
            stats.token_lengths.append(len(encoder.encode(conv.messages)["input_ids"]))
    return stats


def stats_file(source: str | os.PathLike, model: str | None = None, template: str = "vicuna_v1.1",
               skip_bad: bool = False) -> DataStats:
    """Statistics of a conversation file; token lengths when `model` (a folder or `embedded`) is given."""
    convs = load_conversations(source, skip_bad=skip_bad)
    encoder = None
    if model is not None:
        from ds_vicuna.encoding import get_encoder
        from ds_vicuna.split import load_tokenizer

        encoder = get_encoder(load_tokenizer(model, template), template)
    return compute_stats(convs, encoder)
