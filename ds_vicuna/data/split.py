"""Splitting stage: long conversations -> pieces that each fit the training length under the chat template.

    ds-vicuna data split clean.jsonl split.jsonl --model embedded --template vicuna_v1.1 --max-length 2048

Conversations are cut at turn boundaries only. Each piece starts with a user turn; the system message, when
there is one, is repeated at the start of every piece, because the model sees each piece alone. Lengths are
measured exactly: the piece is encoded by `ds_vicuna.chat.encoding` with the training template (control tokens and
all). Pieces are filled greedily with user+assistant exchanges while they fit. An exchange that does not fit
even alone has its assistant reply cut at a token boundary (the cut text re-encodes within the limit and never
ends in half a character) and marked `truncated`: training learns its text but never the stop token after it,
so the model does not learn to stop mid-word; such a reply ends its piece. That is counted, as is an exchange
whose user turn alone is too long (dropped). Piece ids are `<id>_<k>`, k counting from 0.

`split_file` streams: conversations are read, split in worker processes (one per core by default) and written
in input order, so memory does not grow with the file and the output is the same for any number of workers.
"""
from __future__ import annotations

import enum
import os
from collections import Counter
from dataclasses import dataclass, field

from ds_vicuna.data.formats import Conversation, ConversationReader, write_conversations
from ds_vicuna.chat.messages import Message, MessageError, Role, validate_messages
from ds_vicuna.data.parallel import ordered_map


class SplitEvent(str, enum.Enum):
    """What splitting did besides cutting at turn boundaries; counted in the summary."""

    SPLIT = "split"  # a conversation that became more than one piece
    TRUNCATED_REPLY = "truncated_reply"  # an assistant reply cut to fit (its stop token is never trained on)
    DROPPED_EXCHANGE = "dropped_exchange"  # a user turn (with the system message) already over the limit
    DROPPED_UNANSWERED = "dropped_unanswered"  # a final user turn without a reply


class SplitError(ValueError):
    """A conversation whose structure is not system?, user, assistant, ... (run `ds-vicuna data clean` first)."""


@dataclass
class SplitReport:
    source: str
    output: str
    max_length: int
    conversations: int = 0
    pieces: int = 0
    events: Counter = field(default_factory=Counter)  # SplitEvent -> count
    longest_piece: int = 0  # tokens

    def as_dict(self) -> dict:
        return {"input": self.source, "output": self.output, "max_length": self.max_length,
                "conversations": self.conversations, "pieces": self.pieces, "longest_piece": self.longest_piece,
                "events": {e.value: self.events[e] for e in SplitEvent if self.events[e]}}

    def table(self) -> str:
        rows = [("conversations", self.conversations), ("pieces", self.pieces)]
        rows += [(e.value, self.events[e]) for e in SplitEvent]
        rows += [(f"longest piece (<= {self.max_length})", self.longest_piece)]
        width = max(len(name) for name, _ in rows)
        lines = [f"split: {self.source} -> {self.output}"]
        return "\n".join(lines + [f"  {name:{width}}  {count:>7}" for name, count in rows])


class Splitter:
    """Splits conversations for one tokenizer, template and maximum length.

    Args:
        tokenizer: a fast Hugging Face tokenizer (the template's control tokens added, see
            `ds_vicuna.add_template_tokens`).
        template: chat template name.
        max_length: the most tokens a piece may have, control tokens included.
    """

    def __init__(self, tokenizer, template: str, max_length: int):
        from ds_vicuna.chat.encoding import get_encoder

        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.tokenizer = tokenizer
        self.encoder = get_encoder(tokenizer, template)
        self.max_length = max_length

    def length(self, messages: list[Message]) -> int:
        """Tokens of the conversation under the template, exactly as training encodes it."""
        return self.encoder.count_tokens(messages)

    def fits(self, messages: list[Message]) -> bool:
        return self.length(messages) <= self.max_length

    def truncate_reply(self, head: list[Message], reply: Message) -> Message | None:
        """The longest token prefix of `reply` with which `head + [reply]` fits, marked truncated; None if no
        text fits.

        The prefix is decoded, so a cut inside a multi-byte character drops the partial character.
        """
        ids = self.tokenizer(reply.content, add_special_tokens=False)["input_ids"]

        def prefix(k: int) -> Message:
            text = self.tokenizer.decode(ids[:k], skip_special_tokens=False).rstrip("\ufffd")
            return Message(Role.ASSISTANT, text, weight=reply.weight, truncated=True)

        low, high = 0, len(ids)  # invariant: prefix(low) fits (or low == 0), prefix(high + 1) does not
        while low < high:
            mid = (low + high + 1) // 2
            if self.fits(head + [prefix(mid)]):
                low = mid
            else:
                high = mid - 1
        # Re-encoding decoded text is not strictly monotone in k; step back until it really fits.
        while low > 0 and not (prefix(low).content.strip() and self.fits(head + [prefix(low)])):
            low -= 1
        return prefix(low) if low > 0 else None

    def split(self, conv: Conversation, events: Counter | None = None) -> list[Conversation]:
        """Cut one conversation into pieces that fit `max_length`.

        Returns:
            The pieces, ids `<id>_<k>`; empty when nothing fits.

        Raises:
            SplitError: the conversation's roles are not system?, user, assistant, ... (naming its id).
        """
        return [piece for piece, _ in self.split_measured(conv, events)]

    def split_measured(self, conv: Conversation, events: Counter | None = None) -> list[tuple[Conversation, int]]:
        """`split`, with each piece's token count (measured while splitting, so never encoded twice)."""
        events = Counter() if events is None else events
        try:
            messages = validate_messages(conv.messages)
        except MessageError as e:
            raise SplitError(f"conversation {conv.id!r}: {e} (clean the data first: ds-vicuna data clean)") from None
        system = messages[:1] if messages[0].role is Role.SYSTEM else []
        turns = messages[len(system):]
        if len(turns) % 2:
            turns = turns[:-1]
            events[SplitEvent.DROPPED_UNANSWERED] += 1
        whole = self.length(system + turns) if turns else 0
        if turns and whole <= self.max_length:  # most conversations: one encode, no cut
            return [(Conversation(f"{conv.id}_0", system + turns), whole)]
        pieces: list[tuple[list[Message], int]] = []
        current, current_length = [], 0
        for i in range(0, len(turns), 2):
            exchange = turns[i:i + 2]
            if current:
                length = self.length(system + current + exchange)
                if length <= self.max_length:
                    current, current_length = current + exchange, length
                    continue
                pieces.append((current, current_length))
            current, current_length = self._fit_exchange(system, exchange, events)
            if current and current[-1].truncated:  # a cut reply ends its piece: nothing follows it
                pieces.append((current, current_length))
                current, current_length = [], 0
        if current:
            pieces.append((current, current_length))
        if len(pieces) > 1:
            events[SplitEvent.SPLIT] += 1
        return [(Conversation(f"{conv.id}_{k}", system + piece), length) for k, (piece, length) in enumerate(pieces)]

    def _fit_exchange(self, system: list[Message], exchange: list[Message], events: Counter
                      ) -> tuple[list[Message], int]:
        """One user+assistant exchange opening a piece: whole, reply truncated, or dropped (`[]`); with its length."""
        length = self.length(system + exchange)
        if length <= self.max_length:
            return exchange, length
        reply = self.truncate_reply(system + exchange[:1], exchange[1])
        if reply is None:
            events[SplitEvent.DROPPED_EXCHANGE] += 1
            return [], 0
        events[SplitEvent.TRUNCATED_REPLY] += 1
        return [exchange[0], reply], self.length(system + [exchange[0], reply])


class _SplitWorker:
    """What a worker process runs: one conversation -> its measured pieces and the events of splitting it."""

    def __init__(self, tokenizer, template: str, max_length: int):
        self.splitter = Splitter(tokenizer, template, max_length)

    def __call__(self, conv: Conversation) -> tuple[list[tuple[Conversation, int]], Counter]:
        events: Counter = Counter()
        return self.splitter.split_measured(conv, events), events


def split_file(source: str | os.PathLike, output: str | os.PathLike, tokenizer, template: str, max_length: int,
               progress: bool = True, workers: int | None = None) -> SplitReport:
    """Split every conversation of a file (ShareGPT/OpenAI JSON(L)) and write the pieces as ShareGPT JSONL.

    Args:
        workers: processes (default: every core); the output is the same for any number.

    Raises:
        FormatError: an unreadable record. SplitError: a conversation with bad role order.
    """
    from tqdm import tqdm

    Splitter(tokenizer, template, max_length)  # bad arguments fail here, before any worker starts
    report = SplitReport(str(source), str(output), max_length)
    reader = ConversationReader(source)
    bar = tqdm(total=reader.size, desc="split", unit="B", unit_scale=True, disable=not progress)

    def pieces():
        for measured, events in ordered_map(_SplitWorker, (tokenizer, template, max_length), reader,
                                            workers or os.cpu_count() or 1, chunk_size=32, context="fork"):
            report.conversations += 1
            report.events.update(events)
            bar.update(reader.bytes_read - bar.n)
            for piece, length in measured:
                report.longest_piece = max(report.longest_piece, length)
                yield piece

    try:
        report.pieces = write_conversations(output, pieces())
    finally:
        bar.close()
    return report
