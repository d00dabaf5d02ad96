"""Optional input filter run before any generation: a local blocked-word list or an OpenAI-compatible endpoint.

    ds-vicuna serve api ... --blocked-words words.txt                       # one word or phrase a line
    ds-vicuna serve api ... --moderation-url https://host/v1/moderations    # {"input": [...]} -> results[].flagged
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ds_vicuna.serve.errors import APIError, ErrorCode


@dataclass
class Moderator:
    """Checks request texts; `check` raises APIError(CONTENT_FILTERED) with the reason when one is rejected.

    Args:
        blocked_words: words or phrases rejected case-insensitively as whole words.
        endpoint: URL of an OpenAI-compatible moderation endpoint (POST {"input": [texts]}).
        api_key: Bearer key for the endpoint.
        http: object with `post(url, json=, headers=, timeout=)` (e.g. the requests module).
    """

    blocked_words: Sequence[str] = ()
    endpoint: str | None = None
    api_key: str | None = None
    http: object = None
    _pattern: "re.Pattern | None" = field(init=False, default=None)

    def __post_init__(self):
        words = [w.strip() for w in self.blocked_words if w.strip()]
        if words:
            alternation = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
            self._pattern = re.compile(rf"(?<!\w)(?:{alternation})(?!\w)", re.IGNORECASE)
        if self.endpoint and self.http is None:
            raise ValueError("a moderation endpoint needs an http client")

    @classmethod
    def from_file(cls, path: str | Path | None, **kwargs) -> "Moderator":
        """A Moderator whose blocked words come from a text file (one a line, '#' comments)."""
        words = []
        if path:
            words = [line.split("#", 1)[0] for line in Path(path).read_text(encoding="utf-8").splitlines()]
        return cls(blocked_words=words, **kwargs)

    @property
    def active(self) -> bool:
        return self._pattern is not None or bool(self.endpoint)

    def check(self, texts: Sequence[str]) -> None:
        """Raise APIError(CONTENT_FILTERED) if any text is rejected."""
        if self._pattern is not None:
            for text in texts:
                match = self._pattern.search(text)
                if match:
                    raise APIError(ErrorCode.CONTENT_FILTERED, f"the input was rejected by moderation: it contains "
                                   f"the blocked term {match.group(0)!r}", "messages")
        if self.endpoint and texts:
            self._check_endpoint(list(texts))

    def _check_endpoint(self, texts: list[str]) -> None:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            reply = self.http.post(self.endpoint, json={"input": texts}, headers=headers, timeout=30)
            reply.raise_for_status()
            results = reply.json()["results"]
        except Exception as err:  # fail closed: unchecked input is not served
            raise APIError(ErrorCode.WORKER_FAILED, f"the moderation service failed: {err}") from None
        for result in results:
            if result.get("flagged"):
                categories = sorted(k for k, v in (result.get("categories") or {}).items() if v)
                raise APIError(ErrorCode.CONTENT_FILTERED, "the input was rejected by moderation"
                               + (f" (categories: {', '.join(categories)})" if categories else ""), "messages")
