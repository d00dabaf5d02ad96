"""Cleaning stage: raw ShareGPT/OpenAI conversations -> clean ShareGPT JSONL, every drop counted by reason.

    ds-vicuna data clean sharegpt.json clean.jsonl --skip-bad --lang en --report clean_report.json

Each conversation is cleaned on its own by `clean_conversation`, which returns the cleaned Conversation or
the `SkipReason` it was dropped for:
1. every message: HTML (as ShareGPT exports it) -> Markdown with markdownify, code blocks keep their
   language; ShareGPT page artifacts ("Copy code", "1 / 1", "Regenerate response" ...) removed; whitespace
   normalised outside code blocks (code is kept byte for byte).
2. roles: consecutive turns of one speaker are one turn cut in two, so they are joined with a blank line; a
   leading assistant turn (the export started mid-conversation) and a trailing unanswered user turn are
   dropped; a system message anywhere but first has no place in the template, so the conversation is dropped.
3. filters: empty turns, replies shorter than `--min-chars`, blocked words, the wrong language.
Exact duplicates (same cleaned messages) are dropped by the driver, keeping the first, so the output is the
same for any number of workers.
"""
from __future__ import annotations

import enum
import hashlib
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from ds_vicuna.formats import BadRecord, Conversation, load_conversations, write_conversations
from ds_vicuna.messages import Message, MessageError, Role, validate_messages


class SkipReason(str, enum.Enum):
    """Why `clean_conversation` (or the driver) dropped a conversation."""

    EMPTY_TURN = "empty_turn"  # a user or assistant turn with no text left after cleaning
    TOO_SHORT = "too_short"  # an assistant reply under --min-chars characters
    NO_REPLY = "no_reply"  # no user turn answered by the assistant is left
    BAD_ROLE_ORDER = "bad_role_order"  # a system message after the first turn
    DUPLICATE = "duplicate"  # the same cleaned messages as an earlier conversation
    WRONG_LANGUAGE = "wrong_language"  # langdetect's language differs from --lang
    BLOCKED_WORD = "blocked_word"  # a word of --blocked-words appears in a turn


class Fix(str, enum.Enum):
    """Repairs that keep a conversation but change its turns; counted so nothing is lost silently."""

    MERGED_TURN = "merged_turn"  # a turn joined to the previous one of the same speaker
    DROPPED_LEADING_ASSISTANT = "dropped_leading_assistant"
    DROPPED_TRAILING_USER = "dropped_trailing_user"
    DROPPED_EMPTY_SYSTEM = "dropped_empty_system"


@dataclass(frozen=True)
class CleanOptions:
    """What `clean_conversation` does besides converting and normalising text.

    Attributes:
        lang: keep only conversations langdetect reads as this ISO 639-1 code (None: no language filter).
        blocked_words: drop conversations containing one of these words or phrases (case-insensitive, whole
            words).
        min_chars: drop conversations with an assistant reply shorter than this many characters.
    """

    lang: str | None = None
    blocked_words: tuple[str, ...] = ()
    min_chars: int = 0

    def __post_init__(self):
        if self.min_chars < 0:
            raise ValueError(f"min_chars must be >= 0, got {self.min_chars}")
        if any(not w.strip() for w in self.blocked_words):
            raise ValueError("blocked_words must not contain empty words")


# ---------------------------------------------------------------- text: HTML -> Markdown, artifacts, whitespace

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_HTML_HINT = re.compile(r"</(p|div|li|ol|ul|pre|code|table|tr|td|th|h[1-6]|blockquote|strong|em|span|a)>"
                        r"|<br\s*/?>|^\s*<(p|div|ol|ul|pre|table|h[1-6])[\s>]", re.IGNORECASE)
# Whole lines the ShareGPT page (not the speakers) wrote.
_ARTIFACT_LINE = re.compile(r"^\s*(Copy code|Copy to clipboard|Regenerate response|Save & Submit)\s*$",
                            re.IGNORECASE)
# "1 / 1" page counters stuck to the start of a turn ("1 / 1Who are you?"); "3 / 4 of a cup" is left alone.
_PAGE_COUNTER = re.compile(r"^\s*\d+ / \d+(?=\S|\s*\n|\s*$)\s*")
# A code block header line left by a text export: "pythonCopy code" or "Copy code".
_CODE_HEADER = re.compile(r"^\s*([\w+#.-]*?)\s*Copy code\s*$")
_CLOSING_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})[ \t]*$")
_LANGUAGE_CLASS = re.compile(r"^(?:language|lang)-(.+)$")


def split_code_blocks(text: str) -> list[tuple[bool, str]]:
    """Cut Markdown into `(is_code, chunk)` parts; fenced blocks (fences included) are the code parts.

    An unclosed fence runs to the end of the text, so nothing after it is ever reformatted.
    """
    parts: list[tuple[bool, list[str]]] = []
    fence = None
    for line in text.split("\n"):
        match = _FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
            parts.append((True, [line]))
            continue
        if fence is not None:
            parts[-1][1].append(line)
            closing = _CLOSING_FENCE.match(line)
            if closing and closing.group(1)[0] == fence[0] and len(closing.group(1)) >= len(fence):
                fence = None
                parts.append((False, []))
            continue
        if not parts or parts[-1][0]:
            parts.append((False, []))
        parts[-1][1].append(line)
    return [(is_code, "\n".join(lines)) for is_code, lines in parts if lines]


def looks_like_html(text: str) -> bool:
    """True when the text (outside Markdown code blocks) has HTML markup, as ShareGPT page exports do.

    A question that merely mentions a tag ("how do I center a <div>?") has no closing tag and stays text.
    """
    return any(not is_code and _HTML_HINT.search(chunk) for is_code, chunk in split_code_blocks(text))


def _code_language(code) -> str:
    for cls in code.get("class") or ():
        match = _LANGUAGE_CLASS.match(cls)
        if match:
            return match.group(1)
    return ""


def _simplify_code_blocks(soup) -> None:
    """Rewrite ShareGPT's `<pre><div>header: python, Copy code</div><code class="language-python">` blocks
    as a plain `<pre><code class="language-python">`, so only the code reaches Markdown."""
    for pre in soup.find_all("pre"):
        code = pre.find("code")
        if code is None:
            continue
        language = _code_language(code)
        if not language:  # the language may only be in the header (`<span>python</span>`)
            header = pre.find("span")
            if header is not None and re.fullmatch(r"[\w+#.-]{1,20}", header.get_text(strip=True)):
                language = header.get_text(strip=True).lower()
        new_code = soup.new_tag("code", attrs={"class": f"language-{language}"} if language else {})
        new_code.string = code.get_text()
        pre.clear()
        pre.append(new_code)


def html_to_markdown(html: str) -> str:
    """ShareGPT HTML -> Markdown: fenced code keeps its language, lists, tables and links survive."""
    from bs4 import BeautifulSoup
    from markdownify import MarkdownConverter

    soup = BeautifulSoup(html, "html.parser")
    for tag in soup.find_all(["button", "svg", "script", "style"]):
        tag.decompose()
    _simplify_code_blocks(soup)

    def language(pre) -> str:
        code = pre.find("code")
        return _code_language(code) if code is not None else ""

    converter = MarkdownConverter(heading_style="ATX", bullets="-", code_language_callback=language,
                                  escape_asterisks=False, escape_underscores=False, escape_misc=False)
    return converter.convert_soup(soup)


def _clean_code_block(block: str) -> str:
    """Drop a "pythonCopy code" header line a text export left as the block's first line."""
    lines = block.split("\n")
    if len(lines) > 1:
        header = _CODE_HEADER.match(lines[1])
        if header:
            fence = _FENCE.match(lines[0]).group(0)
            language = lines[0][len(fence):].strip() or header.group(1)
            lines = [fence + language] + lines[2:]
    return "\n".join(lines)


def _normalise_prose(lines: list[str]) -> list[str]:
    """Trailing spaces off, page-artifact lines out, at most two blank lines in a row."""
    out: list[str] = []
    blank_run = 0
    for line in lines:
        line = line.replace("\xa0", " ").rstrip()
        if _ARTIFACT_LINE.match(line):
            continue
        blank_run = blank_run + 1 if not line else 0
        if blank_run <= 2:
            out.append(line)
    return out


def clean_text(text: str) -> str:
    """One message's text: HTML -> Markdown, page artifacts removed, whitespace normalised outside code.

    Code blocks are kept byte for byte, except a "pythonCopy code" header line a text export left in them.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _PAGE_COUNTER.sub("", text, count=1)
    if looks_like_html(text):
        text = html_to_markdown(text)
    parts = split_code_blocks(text)
    lines: list[str] = []
    for i, (is_code, chunk) in enumerate(parts):
        if not is_code:
            lines += _normalise_prose(chunk.split("\n"))
            continue
        block = _clean_code_block(chunk).split("\n")
        closed = len(block) > 1 and _CLOSING_FENCE.match(block[-1]) is not None
        if closed:  # the fence lines are Markdown, not code: their trailing spaces may go
            block[0], block[-1] = block[0].rstrip(), block[-1].rstrip()
        lines += block
    while lines and not lines[0].strip():
        lines.pop(0)
    last_block = parts[-1][1].split("\n") if parts and parts[-1][0] else []
    unclosed_code_at_end = bool(last_block) and (len(last_block) == 1 or not _CLOSING_FENCE.match(last_block[-1]))
    while lines and not lines[-1].strip() and not unclosed_code_at_end:
        lines.pop()
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ roles and filters


def fix_roles(messages: Sequence[Message], fixes: Counter | None = None) -> list[Message] | SkipReason:
    """Join consecutive same-speaker turns, drop a leading assistant and a trailing user turn, then validate.

    Returns:
        The messages (system?, user, assistant, ... ending with the assistant), or the SkipReason.
    """
    fixes = Counter() if fixes is None else fixes
    out: list[Message] = []
    for i, message in enumerate(messages):
        if message.role is Role.SYSTEM and i > 0 and any(m.role is not Role.SYSTEM for m in messages[:i]):
            return SkipReason.BAD_ROLE_ORDER
        if out and out[-1].role is message.role:
            out[-1] = Message(message.role, f"{out[-1].content}\n\n{message.content}".strip())
            fixes[Fix.MERGED_TURN] += 1
        else:
            out.append(message)
    if out and out[0].role is Role.SYSTEM and not out[0].content:
        out.pop(0)
        fixes[Fix.DROPPED_EMPTY_SYSTEM] += 1
    start = 1 if out and out[0].role is Role.SYSTEM else 0
    if len(out) > start and out[start].role is Role.ASSISTANT:
        out.pop(start)
        fixes[Fix.DROPPED_LEADING_ASSISTANT] += 1
    if out and out[-1].role is Role.USER:
        out.pop()
        fixes[Fix.DROPPED_TRAILING_USER] += 1
    if not any(m.role is Role.ASSISTANT for m in out):
        return SkipReason.NO_REPLY
    try:
        return validate_messages(out)
    except MessageError:  # unreachable after the repairs above; kept as the one structure gate
        return SkipReason.BAD_ROLE_ORDER


def _prose(messages: Iterable[Message]) -> str:
    return "\n".join(chunk for m in messages for is_code, chunk in split_code_blocks(m.content) if not is_code)


def detect_language(text: str) -> str | None:
    """langdetect's language code for the text, deterministic (seeded); None when it finds no features."""
    from langdetect import DetectorFactory, detect
    from langdetect.lang_detect_exception import LangDetectException

    DetectorFactory.seed = 0
    try:
        return detect(text)
    except LangDetectException:
        return None


class Cleaner:
    """`clean_conversation` bound to its options, with the blocked-word pattern compiled once (picklable)."""

    def __init__(self, options: CleanOptions):
        self.options = options
        words = sorted({w.strip().lower() for w in options.blocked_words}, key=len, reverse=True)
        self.blocked = (re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, words)) + r")(?!\w)", re.IGNORECASE)
                        if words else None)

    def __call__(self, conv: Conversation) -> tuple[Conversation | SkipReason, Counter]:
        fixes: Counter = Counter()
        return clean_conversation(conv, self, fixes), fixes


def clean_conversation(conv: Conversation, cleaner: Cleaner, fixes: Counter | None = None
                       ) -> Conversation | SkipReason:
    """Clean one conversation (text, roles, filters; duplicates are the driver's job).

    Args:
        conv: the conversation as loaded.
        cleaner: the options and their compiled patterns.
        fixes: counts the repairs made (`Fix`) when given.

    Returns:
        The cleaned Conversation, or the SkipReason it is dropped for.
    """
    options = cleaner.options
    messages = [Message(m.role, clean_text(m.content)) for m in conv.messages]
    if any(not m.content for m in messages if m.role is not Role.SYSTEM):
        return SkipReason.EMPTY_TURN
    fixed = fix_roles(messages, fixes)
    if isinstance(fixed, SkipReason):
        return fixed
    if any(len(m.content) < options.min_chars for m in fixed if m.role is Role.ASSISTANT):
        return SkipReason.TOO_SHORT
    if cleaner.blocked is not None and any(cleaner.blocked.search(m.content) for m in fixed):
        return SkipReason.BLOCKED_WORD
    if options.lang is not None:
        language = detect_language(_prose(fixed)[:4000])
        if language is not None and language != options.lang:
            return SkipReason.WRONG_LANGUAGE
    return Conversation(conv.id, fixed)


def content_hash(messages: Sequence[Message]) -> str:
    """A hash of the roles and texts (not the id), equal for exact duplicates."""
    payload = json.dumps([[m.role.value, m.content] for m in messages], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


# ------------------------------------------------------------------------------------------------ driver


@dataclass
class CleanReport:
    """What `clean_file` kept and dropped."""

    source: str
    output: str
    total: int = 0  # records in the input, bad ones included
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)  # SkipReason or BadRecord -> count
    fixes: Counter = field(default_factory=Counter)  # Fix -> count

    def as_dict(self) -> dict:
        return {"input": self.source, "output": self.output, "total": self.total, "kept": self.kept,
                "skipped": {r.value: n for r, n in _ordered(self.skipped)},
                "fixes": {r.value: n for r, n in _ordered(self.fixes)}}

    def table(self) -> str:
        rows = [("kept", self.kept)] + [(f"skipped: {r.value}", n) for r, n in _ordered(self.skipped)]
        rows += [("total", self.total)] + [(f"fixed: {r.value}", n) for r, n in _ordered(self.fixes)]
        width = max(len(name) for name, _ in rows)
        lines = [f"clean: {self.source} -> {self.output}", f"  {'':{width}}  {'count':>7}"]
        lines += [f"  {name:{width}}  {count:>7}" for name, count in rows]
        return "\n".join(lines)


def _ordered(counts: Counter) -> list:
    """Reasons in their enums' declaration order (bad records first), so tables and reports are stable."""
    order = list(BadRecord) + list(SkipReason) + list(Fix)
    return [(r, counts[r]) for r in order if counts.get(r)]


def read_blocked_words(path: str | os.PathLike) -> tuple[str, ...]:
    """One word or phrase a line; blank lines and `#` comments are ignored."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return tuple(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))


def _map(cleaner: Cleaner, convs: list[Conversation], workers: int, progress: bool):
    from tqdm import tqdm

    bar = dict(total=len(convs), desc="clean", unit="conv", disable=not progress)
    if workers <= 1 or len(convs) < 2:
        yield from tqdm(map(cleaner, convs), **bar)
        return
    import multiprocessing

    chunksize = max(1, min(64, len(convs) // (workers * 8)))
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        # imap (not imap_unordered): results come back in input order, so the output never depends on workers.
        yield from tqdm(pool.imap(cleaner, convs, chunksize=chunksize), **bar)


def clean_file(source: str | os.PathLike, output: str | os.PathLike, options: CleanOptions = CleanOptions(),
               workers: int | None = None, skip_bad: bool = False, progress: bool = True) -> CleanReport:
    """Clean a conversation file into ShareGPT JSONL.

    Args:
        source: ShareGPT/OpenAI JSON list or JSONL.
        output: the cleaned JSONL to write.
        options: filters.
        workers: processes (default: every core); the output is the same for any number.
        skip_bad: count unreadable records instead of raising.
        progress: show a tqdm bar on stderr.

    Returns:
        The report (kept, skipped per reason, fixes per kind).

    Raises:
        FormatError: a bad record without `skip_bad`.
    """
    report = CleanReport(str(source), str(output))
    convs = load_conversations(source, skip_bad=skip_bad, skips=report.skipped)
    report.total = len(convs) + sum(report.skipped.values())
    seen: set[str] = set()
    kept: list[Conversation] = []
    cleaner = Cleaner(options)
    for result, fixes in _map(cleaner, convs, workers or os.cpu_count() or 1, progress):
        report.fixes.update(fixes)
        if isinstance(result, Conversation):
            digest = content_hash(result.messages)
            if digest in seen:
                result = SkipReason.DUPLICATE
            else:
                seen.add(digest)
                kept.append(result)
        if isinstance(result, SkipReason):
            report.skipped[result] += 1
    report.kept = write_conversations(output, kept)
    return report
