"""Contamination check: training conversations that share a long word n-gram with eval questions or answers.

    ds-vicuna data overlap train.jsonl --questions vicuna_80 --questions mt_bench --report overlap.json
    ds-vicuna data overlap train.jsonl --questions question.jsonl --questions reference_answer/gpt-4.jsonl
    ds-vicuna data clean raw.json clean.jsonl --drop-overlap vicuna_80 --drop-overlap mt_bench

What is indexed: every question turn and every reference answer of the given sets. A set is a bundled name
(`vicuna_80`, `mt_bench_mini`, `mt_bench`, `vicuna_bench`: the same files `ds-vicuna eval --questions NAME` asks,
see `ds_vicuna.data.question_sets`; `mt_bench` and `vicuna_bench` with FastChat's GPT-4 reference answers) or a
JSONL file in FastChat's formats: questions (`text` or `turns`, optional `reference`) and answer files
(`choices[].turns`, as FastChat's `reference_answer/gpt-4.jsonl`). Texts are compared as lowercase word
sequences (letters and digits; case, punctuation, Markdown and spacing do not matter). A training conversation
overlaps when any of its messages holds one of the indexed `n`-word sequences (default 8, shorter than the 13 of
GPT-3's check because chat questions are short). A question shorter than n words cannot be matched and is
reported as such.
"""
from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from ds_vicuna.data.formats import Conversation, ConversationReader
from ds_vicuna.data.jsonl import RecordError, iter_jsonl
from ds_vicuna.data.parallel import ordered_map
from ds_vicuna.data.question_sets import UnknownQuestionSet, resolve_question_set

DEFAULT_NGRAM = 8
_WORD = re.compile(r"[^\W_]+")


class OverlapError(ValueError):
    """An eval file that cannot be read; the message names the file, line and field."""


def words(text: str) -> list[str]:
    """The text as lowercase words (letters and digits), the unit n-grams are made of."""
    return _WORD.findall(text.lower())


def eval_texts(label: str, path: Path) -> Iterable[tuple[str, str]]:
    """`(where, text)` for every question turn and reference answer of a FastChat-style JSONL file.

    Raises:
        OverlapError: a line that is not JSON, or a record with none of text / turns / reference / choices.
    """
    try:
        for lineno, record in iter_jsonl(path):  # the eval stages' strict reader: errors name file:line
            qid = record.get("question_id", record.get("id", lineno))
            found = False
            for key, texts in (("text", [record.get("text")]), ("turns", record.get("turns") or []),
                               ("reference", record.get("reference") or []),
                               *((f"choices[{c}].turns", choice.get("turns") or [])
                                 for c, choice in enumerate(record.get("choices") or []) if isinstance(choice, dict))):
                for t, text in enumerate(texts):
                    if isinstance(text, str) and text.strip():
                        found = True
                        yield f"{label}:{qid}:{key}" + (f"[{t}]" if key != "text" else ""), text
            if not found:
                raise OverlapError(f"{path}:{lineno}: no text, turns, reference or choices[].turns to index")
    except RecordError as e:
        raise OverlapError(str(e)) from None


@dataclass
class OverlapIndex:
    """The n-grams of eval texts, and where each comes from (picklable: workers get a copy).

    Attributes:
        n: words per n-gram.
        grams: n-gram (words joined by spaces) -> the eval texts it occurs in.
        texts: eval text -> how many n-grams it has.
        too_short: eval texts with fewer than n words (cannot be matched).
    """

    n: int = DEFAULT_NGRAM
    grams: dict[str, set[str]] = field(default_factory=dict)
    texts: dict[str, int] = field(default_factory=dict)
    too_short: list[str] = field(default_factory=list)
    vocabulary: set[str] = field(default_factory=set)

    def add(self, where: str, text: str) -> None:
        tokens = words(text)
        if len(tokens) < self.n:
            self.too_short.append(where)
            return
        grams = {" ".join(tokens[i:i + self.n]) for i in range(len(tokens) - self.n + 1)}
        self.texts[where] = len(grams)
        for gram in grams:
            self.grams.setdefault(gram, set()).add(where)
        self.vocabulary.update(tokens)

    def shared(self, text: str) -> dict[str, set[str]]:
        """The indexed n-grams `text` holds: eval text -> the shared n-grams."""
        found: dict[str, set[str]] = {}
        run: list[str] = []
        # Only runs of words that all occur in some eval text can hold an indexed n-gram: check just those.
        for word in words(text) + [""]:
            if word in self.vocabulary:
                run.append(word)
                continue
            for i in range(len(run) - self.n + 1):
                gram = " ".join(run[i:i + self.n])
                for where in self.grams.get(gram, ()):
                    found.setdefault(where, set()).add(gram)
            run = []
        return found

    def matches(self, messages) -> dict[str, set[str]]:
        """The indexed n-grams any message holds (empty: no overlap)."""
        found: dict[str, set[str]] = {}
        for message in messages:
            for where, grams in self.shared(message.content).items():
                found.setdefault(where, set()).update(grams)
        return found


def build_index(sets: Sequence[str], n: int = DEFAULT_NGRAM) -> OverlapIndex:
    """Index the question turns and reference answers of each bundled set name or file.

    A bundled set (`ds_vicuna.data.question_sets`) brings its reference answer file too (FastChat's GPT-4
    answers for `mt_bench` and `vicuna_bench`).

    Raises:
        OverlapError: an unknown set, an unreadable file, or nothing to index.
    """
    if n < 1:
        raise OverlapError(f"n-gram length must be >= 1, got {n}")
    index = OverlapIndex(n)
    for name in sets:
        try:
            files = resolve_question_set(name)
        except UnknownQuestionSet as err:
            raise OverlapError(str(err)) from None
        for path in (files.questions, files.reference_answers):
            for where, text in eval_texts(files.name, path) if path else ():
                index.add(where, text)
    if not index.texts:
        raise OverlapError(f"{', '.join(sets)}: no question or answer has {n} words or more to index")
    return index


@dataclass
class OverlapReport:
    """Training conversations that overlap the eval sets."""

    sources: list[str]
    sets: list[str]
    n: int
    conversations: int = 0
    hits: list[dict] = field(default_factory=list)  # one per overlapping conversation
    too_short: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        per_text = Counter(where for hit in self.hits for where in hit["eval"])
        return {"input": self.sources, "questions": self.sets, "ngram": self.n, "conversations": self.conversations,
                "overlapping": len(self.hits), "eval_texts_matched": dict(sorted(per_text.items())),
                "eval_texts_too_short": self.too_short, "hits": self.hits}

    def table(self, limit: int = 20) -> str:
        lines = [f"overlap: {len(self.hits)} of {self.conversations} training conversations share a run of "
                 f"{self.n} words with {', '.join(self.sets)}"]
        for hit in self.hits[:limit]:
            best = max(hit["eval"], key=lambda w: hit["eval"][w]["share"])
            lines.append(f"  {hit['id']}  ({hit['source']})  {best}: {hit['eval'][best]['shared']} shared n-grams "
                         f"({hit['eval'][best]['share']:.0%} of it), e.g. \"{hit['eval'][best]['example']}\"")
        if len(self.hits) > limit:
            lines.append(f"  ... and {len(self.hits) - limit} more (see --report)")
        if self.too_short:
            lines.append(f"  {len(self.too_short)} eval texts have fewer than {self.n} words and cannot be matched "
                         f"(e.g. {self.too_short[0]}); lower --ngram to check them")
        return "\n".join(lines)


class _Scan:
    """What a worker process runs: a conversation -> (its id, the overlap found)."""

    def __init__(self, index: OverlapIndex):
        self.index = index

    def __call__(self, conv: Conversation) -> tuple[str, dict[str, set[str]]]:
        return conv.id, self.index.matches(conv.messages)


def overlap_files(sources: Sequence[str | os.PathLike], index: OverlapIndex, sets: Sequence[str],
                  workers: int = 1, skip_bad: bool = False, progress: bool = True) -> OverlapReport:
    """Scan training files (streamed, in `workers` processes) for conversations that overlap the index."""
    from tqdm import tqdm

    report = OverlapReport([str(s) for s in sources], list(sets), index.n, too_short=list(index.too_short))
    for source in sources:
        reader = ConversationReader(source, skip_bad=skip_bad)
        bar = tqdm(total=reader.size, desc="overlap", unit="B", unit_scale=True, disable=not progress)
        for conv_id, found in ordered_map(_Scan, (index,), reader, workers, chunk_size=64):
            report.conversations += 1
            bar.update(reader.bytes_read - bar.n)
            if found:
                report.hits.append({"id": conv_id, "source": str(source), "eval": {
                    where: {"shared": len(grams), "share": round(len(grams) / index.texts[where], 3),
                            "example": sorted(grams)[0]} for where, grams in sorted(found.items())}})
        bar.close()
    return report
