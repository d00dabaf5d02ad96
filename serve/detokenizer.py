"""Incremental detokenization: a growing list of token ids becomes text pieces that are final.

    text = IncrementalText(tokenizer, stop=["</s>"], context_ids=prompt_ids, lead=" ")
    piece, hit_stop = text.add(token_id)   # per generated token
    rest = text.finish()                   # when generation ends for another reason

A piece is never half of a multi-byte UTF-8 character and never a prefix of a stop string that may still
complete; each `add` decodes only a short window of tokens, so a long reply costs the same per token as a short one.
"""
from __future__ import annotations

from typing import Sequence


class IncrementalText:
    """Turns a growing list of token ids into final text pieces; finds stop strings across token boundaries.

    Each `add` decodes only a short window (a few tokens before the unreleased ones), the way vLLM and TGI
    detokenize incrementally, so a long reply costs the same per token as a short one. The window starts in the
    prompt (`context_ids`), so the first token decodes as it reads after the prompt (its leading space kept).

    Args:
        tokenizer: the model's tokenizer.
        stop: texts that end the reply; the reply is cut before the first one.
        context_ids: the prompt (its last few ids are decoded as left context).
        lead: text to drop from the reply's start when the reply begins with it.
    """

    CONTEXT = 5  # prompt tokens of left context
    MAX_PENDING = 4  # a UTF-8 character spans at most 4 byte tokens: longer undecodable runs are released as is

    def __init__(self, tokenizer, stop: Sequence[str], context_ids: Sequence[int] = (), lead: str = ""):
        self._tokenizer = tokenizer
        self._stop = [s for s in stop if s]
        self._longest_stop = max((len(s) for s in self._stop), default=0)
        self._lead = lead
        self._lead_checked = not lead
        self._window = list(context_ids[-self.CONTEXT:])
        self._read = len(self._window)  # window ids before this index are already in `text`
        self.ids: list[int] = []
        self.text = ""  # the reply's text so far, up to a stop string once one is found
        self.emitted = 0  # characters of `text` already released (or dropped as the lead)

    def add(self, token_id: int) -> tuple[str, bool]:
        """Append one token; returns (newly final text, hit_stop_string)."""
        self.ids.append(token_id)
        self._window.append(token_id)
        self._decode_window()
        if not self._lead_checked:
            if len(self.text) < len(self._lead) and self._lead.startswith(self.text):
                return "", False  # could still be the lead
            self._lead_checked = True
            if self.text.startswith(self._lead):
                self.emitted = len(self._lead)
        hit = self._find_stop()
        if hit is not None:
            self.text = self.text[:hit]
            return self._release(len(self.text)), True
        safe = len(self.text)
        while safe > self.emitted and self.text[safe - 1] == "\ufffd":  # an unfinished UTF-8 sequence
            safe -= 1
        safe -= self._partial_stop_suffix(self.text[max(0, safe - self._longest_stop):safe])
        return self._release(max(safe, self.emitted)), False

    def finish(self) -> str:
        """Release whatever is held back when generation ends for another reason."""
        if self._read < len(self._window):  # undecoded tail (e.g. an unfinished UTF-8 byte run)
            self._decode_window(force=True)
        if not self._lead_checked and self._lead.startswith(self.text):
            self.emitted = len(self.text)  # the reply was (part of) the lead and nothing else
        return self._release(len(self.text))

    def _decode_window(self, force: bool = False) -> None:
        """Move newly decodable text from the window into `text`; keep a window of left context."""
        decode = self._tokenizer.decode
        before = decode(self._window[:self._read], skip_special_tokens=True, clean_up_tokenization_spaces=False)
        after = decode(self._window, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        pending = len(self._window) - self._read
        if not force and pending < self.MAX_PENDING and (len(after) <= len(before) or after.endswith("\ufffd")):
            return  # nothing new yet, or half a character: wait for the next token
        self.text += after[len(before):]
        self._window = self._window[self._read:]
        self._read = len(self._window)

    def _find_stop(self) -> int | None:
        start = max(0, self.emitted - self._longest_stop)
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
