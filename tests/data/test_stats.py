"""ds_vicuna.data.stats: counts per role and nearest-rank token percentiles."""
import pytest

from ds_vicuna.data.formats import Conversation
from ds_vicuna.chat.messages import Message, Role
from ds_vicuna.data.stats import compute_stats, percentile


class CharEncoder:
    """Stands in for a ConversationEncoder: one token per character, so lengths are known."""

    def encode(self, messages):
        return {"input_ids": [0] * sum(len(m.content) for m in messages)}


def test_percentile_is_nearest_rank():
    values = list(range(1, 101))
    assert [percentile(values, q) for q in (50, 90, 99, 100)] == [50, 90, 99, 100]
    assert percentile([7], 50) == 7
    with pytest.raises(ValueError):
        percentile([], 50)


def test_compute_stats_counts_roles_chars_and_tokens():
    convs = [Conversation(str(n), [Message(Role.USER, "q" * n), Message(Role.ASSISTANT, "a" * n)])
             for n in range(1, 11)]
    convs[0].messages.insert(0, Message(Role.SYSTEM, "sys"))
    stats = compute_stats(convs, CharEncoder()).as_dict()
    assert stats["conversations"] == 10
    assert stats["turns"] == {"system": 1, "user": 10, "assistant": 10}
    assert stats["chars"] == {"system": 3, "user": 55, "assistant": 55}
    assert stats["tokens"] == {"p50": 10, "p90": 18, "p99": 20, "max": 20, "mean": 11.3, "total": 113}
    assert "tokens" not in compute_stats(convs).as_dict()
