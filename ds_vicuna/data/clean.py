"""Cleaning stage: raw ShareGPT/OpenAI conversations -> clean ShareGPT JSONL, every drop and repair counted.

    ds-vicuna data clean sharegpt.json clean.jsonl --skip-bad --lang en --report clean_report.json
    ds-vicuna data clean sharegpt.json clean.jsonl --drop-overlap vicuna_80 --drop-overlap mt_bench

Each conversation is cleaned on its own by `clean_conversation`, which returns the cleaned Conversation or
the `SkipReason` it was dropped for, and counts each repair (`Fix`):
1. text, turn by turn (`clean_text`):
   - an assistant turn that is a ShareGPT page export (the whole turn is balanced block HTML such as
     `<div class="markdown prose">...</div>`, with the page's classes or its tags run together as the page
     serialised them) becomes Markdown with markdownify: code blocks keep their
     language, table cells escape `|`, `<br>` becomes a hard break (`html_converted`). Anything else is
     Markdown or plain text already and is never converted: a turn that mentions `<br>` or pastes HTML keeps it,
     a reply that is HTML laid out over indented lines (HTML the user asked for) keeps it, and user and system
     turns are never converted.
   - ShareGPT page artifacts go, as FastChat's cleaner removes them: the "1 / 1" page counter opening a turn,
     "Copy code" glued to a code fence or to the first code line (```` ```bashCopy code ````, `pythonCopy
     codeimport os`) and code blocks holding nothing else, "Copy5 chars / 1 words", page-button lines
     ("Regenerate response" ...).
   - whitespace outside code: CRLF/CR line endings become LF (`line_endings`); trailing spaces off (a
     two-space hard break is kept), at most two blank lines in a row, no blank lines before or after the text
     (`whitespace`, one count per turn changed). Code blocks are kept byte for byte.
2. a canned error reply ("Too many requests in 1 hour. Try again later.") ends the conversation: the
   exchanges before it are kept (`cut_at_canned_reply`), nothing after it.
3. roles: consecutive turns of one speaker are one turn cut in two, so they are joined with a blank line; a
   leading assistant turn (the export started mid-conversation) and a trailing unanswered user turn are
   dropped; a system message anywhere but first has no place in the template, so the conversation is dropped.
4. filters: empty turns, replies shorter than `--min-chars`, blocked words, the wrong language (texts with too
   few letters to judge are kept and counted as `language_not_judged`), overlap with eval questions.
The driver streams: records are read, cleaned in worker processes and written in input order, so memory does
not grow with the file and the output is the same for any number of workers. It drops exact duplicates (same
cleaned messages) keeping the first; ids are unique (see `ds_vicuna.data.formats`).
"""
from __future__ import annotations

import enum
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Iterable, Sequence

from ds_vicuna.data.formats import BadRecord, Conversation, ConversationReader, write_conversations
from ds_vicuna.chat.messages import Message, MessageError, Role, validate_messages
from ds_vicuna.data.parallel import HashSet, hash64, ordered_map


class SkipReason(str, enum.Enum):
    """Why `clean_conversation` (or the driver) dropped a conversation."""

    EMPTY_TURN = "empty_turn"  # a user or assistant turn with no text left after cleaning
    TOO_SHORT = "too_short"  # an assistant reply under --min-chars characters
    NO_REPLY = "no_reply"  # no user turn answered by the assistant is left
    BAD_ROLE_ORDER = "bad_role_order"  # a system message after the first turn
    CANNED_REPLY = "canned_reply"  # the first reply is a canned error ("Too many requests in 1 hour ...")
    DUPLICATE = "duplicate"  # the same cleaned messages as an earlier conversation
    WRONG_LANGUAGE = "wrong_language"  # langdetect's language differs from --lang
    BLOCKED_WORD = "blocked_word"  # a word of --blocked-words appears in a turn
    EVAL_OVERLAP = "eval_overlap"  # shares a long n-gram with an eval question or reference (--drop-overlap)


class Fix(str, enum.Enum):
    """Repairs that keep a conversation but change it, and decisions that keep it; counted so nothing is silent."""

    HTML_CONVERTED = "html_converted"  # a turn that was a ShareGPT HTML export, now Markdown
    PAGE_COUNTER = "page_counter"  # a "1 / 1" page counter removed from the start of a turn
    COPY_CODE = "copy_code"  # a "Copy code" header removed from a code block (or an empty block removed)
    COPY_CHARS = "copy_chars"  # a "Copy5 chars / 1 words" counter removed
    PAGE_BUTTON_LINE = "page_button_line"  # a "Regenerate response" / "Copy to clipboard" ... line removed
    CUT_AT_CANNED_REPLY = "cut_at_canned_reply"  # the conversation ended before a canned error reply
    MERGED_TURN = "merged_turn"  # a turn joined to the previous one of the same speaker
    DROPPED_LEADING_ASSISTANT = "dropped_leading_assistant"
    DROPPED_TRAILING_USER = "dropped_trailing_user"
    DROPPED_EMPTY_SYSTEM = "dropped_empty_system"
    LANGUAGE_NOT_JUDGED = "language_not_judged"  # --lang: too little text to tell its language; kept
    LINE_ENDINGS = "line_endings"  # a turn's CRLF / CR line endings made LF
    WHITESPACE = "whitespace"  # a turn's trailing spaces, blank-line runs or leading/trailing blank lines trimmed


# The ChatGPT page's canned error replies (not the model's words); FastChat's cleaner drops the first one too.
CANNED_REPLIES = ("Too many requests in 1 hour. Try again later.",
                  "An error occurred. If this issue persists please contact us through our help center at "
                  "help.openai.com.",
                  "Something went wrong, please try reloading the conversation.")
# langdetect is unreliable on a few words ("Hi / Hello!" reads as Finnish): below this many letters, or when its
# best guess is less likely than this, the conversation is kept and counted as language_not_judged.
LANG_MIN_LETTERS = 20
LANG_MIN_PROBABILITY = 0.8


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


# ---------------------------------------------------------------- text: HTML exports, artifacts, whitespace

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_CLOSING_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})[ \t]*$")
_BLOCK_TAGS = r"div|p|ol|ul|pre|table|h[1-6]|blockquote"
_EXPORT_START = re.compile(rf"^\s*<({_BLOCK_TAGS})(\s[^<>]*)?>", re.IGNORECASE)
_EXPORT_END = re.compile(rf"</({_BLOCK_TAGS})>\s*$", re.IGNORECASE)
_PAGE_CLASSES = frozenset(("markdown", "prose"))  # the ChatGPT page's answer container
_VOID_TAGS = frozenset("area base br col embed hr img input link meta param source track wbr".split())
# Whole lines the ShareGPT page (not the speakers) wrote.
_BUTTON_LINE = re.compile(r"^\s*(Copy code|Copy to clipboard|Regenerate response|Save & Submit)\s*$", re.IGNORECASE)
# "1 / 1" page counters stuck to the start of a turn ("1 / 1Who are you?"); "3 / 4 of a cup" is left alone.
_PAGE_COUNTER = re.compile(r"^\s*\d+ / \d+(?=\S|\s*\n|\s*$)\s*")
_COPY_CHARS = re.compile(r"Copy\d+ chars / \d+ words")
# "Copy code" where a text export glued the code block's header: after the fence (```bashCopy code) or as the
# first code line (pythonCopy code, pythonCopy codeimport os); group 1 the language, group 2 code after it.
# The glued code starts right after "Copy code": "Copy code later" is a line of text, not a header.
_COPY_CODE = re.compile(r"^[ \t]*([\w+#.-]*?)[ \t]*(?:Copy code)+(|\S.*)$")
_LANGUAGE_CLASS = re.compile(r"^(?:language|lang)-(.+)$")
_HARD_BREAK = re.compile(r"\S {2,}$")


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


class _TagBalance(HTMLParser):
    """Checks that HTML is a sequence of balanced elements with no text outside them, and notes whether it is
    laid out by hand (indented lines between tags) or carries the ChatGPT page's classes."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.open: list[str] = []
        self.balanced = True
        self.loose_text = False
        self.laid_out = False  # a newline between two tags outside <pre>: HTML written for reading
        self.page_classes = False  # class="markdown prose ...": the ChatGPT page's own markup

    def handle_starttag(self, tag, attrs):
        classes = (dict(attrs).get("class") or "").split()
        if any(c in _PAGE_CLASSES or c.startswith("request-:") for c in classes):
            self.page_classes = True
        if tag not in _VOID_TAGS:
            self.open.append(tag)

    def handle_endtag(self, tag):
        if tag in _VOID_TAGS:
            return
        if self.open and self.open[-1] == tag:
            self.open.pop()
        else:
            self.balanced = False

    def handle_data(self, data):
        if not self.open and data.strip():
            self.loose_text = True
        if not data.strip() and "\n" in data and "pre" not in self.open:
            self.laid_out = True


def is_html_export(text: str) -> bool:
    """True when a turn is HTML as a ShareGPT page export holds it, so it must be converted to Markdown.

    The whole turn must be block elements (`<div>`, `<p>`, `<ol>` ...) that open and close in balance, with no
    text outside them. Markdown that mentions tags ("Use the `<br>` tag", "how do I center a <div>?"), pastes
    an HTML snippet between words, or holds HTML in code blocks fails that test and is left as it is. And it
    must read like the page's markup: the page's classes (`markdown prose`), or tags run together as a browser
    serialises them. HTML laid out over indented lines (`<div>\n  <p>Hello</p>\n</div>`) is a reply that is
    HTML because the user asked for HTML, and stays as it is.
    """
    if not (_EXPORT_START.match(text) and _EXPORT_END.search(text)):
        return False
    parser = _TagBalance()
    parser.feed(text)
    parser.close()
    shaped = parser.balanced and not parser.open and not parser.loose_text
    return shaped and (parser.page_classes or not parser.laid_out)


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


def _converter():
    from markdownify import MarkdownConverter

    class ShareGPTConverter(MarkdownConverter):
        """markdownify, with table cells that keep a `|` and a `<br>` (GFM has no other line break in a cell)."""

        def convert_td(self, el, text, parent_tags):
            return super().convert_td(el, text.replace("|", "\\|"), parent_tags)

        def convert_th(self, el, text, parent_tags):
            return super().convert_th(el, text.replace("|", "\\|"), parent_tags)

        def convert_br(self, el, text, parent_tags):
            if {"td", "th"} & parent_tags:
                return "<br>" + text
            return super().convert_br(el, text, parent_tags)

    return ShareGPTConverter


def html_to_markdown(html: str) -> str:
    """ShareGPT HTML -> Markdown: fenced code keeps its language, lists, tables and links survive, `<br>` is a
    hard break (two trailing spaces)."""
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(html, "html.parser")
    for tag in soup.find_all(["button", "svg", "script", "style"]):
        tag.decompose()
    _simplify_code_blocks(soup)

    def language(pre) -> str:
        code = pre.find("code")
        return _code_language(code) if code is not None else ""

    converter = _converter()(heading_style="ATX", bullets="-", code_language_callback=language,
                             escape_asterisks=False, escape_underscores=False, escape_misc=False)
    return converter.convert_soup(soup).replace("\xa0", " ")


def _clean_code_block(block: str, fixes: Counter) -> str | None:
    """Drop the "Copy code" header a text export glued to a block's fence or first line; None: nothing is left."""
    lines = block.split("\n")
    fence = _FENCE.match(lines[0]).group(0)
    glued = _COPY_CODE.match(lines[0][len(fence):])
    if glued:  # ```bashCopy code / ```pythonCopy codeimport os
        lines[0:1] = [fence + glued.group(1)] + ([glued.group(2)] if glued.group(2) else [])
    elif len(lines) > 1 and (glued := _COPY_CODE.match(lines[1])):  # ```\npythonCopy code[import os]
        language = lines[0][len(fence):].strip() or glued.group(1)
        lines[0:2] = [fence + language] + ([glued.group(2)] if glued.group(2) else [])
    closed = len(lines) > 1 and _CLOSING_FENCE.match(lines[-1]) is not None
    if glued:
        fixes[Fix.COPY_CODE] += 1
        if not any(line.strip() for line in (lines[1:-1] if closed else lines[1:])):
            return None  # "```\nCopy code\n```": the export's empty block
    if closed:  # the fence lines are Markdown, not code: their trailing spaces may go
        lines[0], lines[-1] = lines[0].rstrip(), lines[-1].rstrip()
    return "\n".join(lines)


def _normalise_prose(lines: list[str], fixes: Counter) -> tuple[list[str], bool]:
    """Trailing spaces off (a hard break keeps two), page-button lines out, at most two blank lines in a row.

    Returns:
        (the lines, whether any whitespace changed).
    """
    out: list[str] = []
    blank_run, changed = 0, False
    for i, line in enumerate(lines):
        if _BUTTON_LINE.match(line):
            fixes[Fix.PAGE_BUTTON_LINE] += 1
            continue
        if _COPY_CHARS.search(line):
            fixes[Fix.COPY_CHARS] += len(_COPY_CHARS.findall(line))
            line = _COPY_CHARS.sub("", line)
        following = lines[i + 1] if i + 1 < len(lines) else ""
        hard_break = _HARD_BREAK.search(line) is not None and following.strip() != ""
        trimmed = line.rstrip() + ("  " if hard_break else "")
        changed = changed or trimmed != line
        blank_run = blank_run + 1 if not trimmed else 0
        if blank_run <= 2:
            out.append(trimmed)
        else:
            changed = True
    return out, changed


def clean_text(text: str, role: Role = Role.ASSISTANT, fixes: Counter | None = None) -> str:
    """One message's text: ShareGPT HTML export -> Markdown, page artifacts removed, whitespace normalised.

    Args:
        text: the message as read.
        role: only an assistant turn can be a ShareGPT HTML export; user and system text is never converted.
        fixes: counts each repair (`Fix`) when given.

    Code blocks are kept byte for byte, except a "Copy code" header a text export glued into them.
    """
    fixes = Counter() if fixes is None else fixes
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        fixes[Fix.LINE_ENDINGS] += 1
    text, counters = _PAGE_COUNTER.subn("", text, count=1)
    if counters:
        fixes[Fix.PAGE_COUNTER] += 1
    converted = role is Role.ASSISTANT and is_html_export(text)
    if converted:
        text = html_to_markdown(text)
        fixes[Fix.HTML_CONVERTED] += 1
    parts = split_code_blocks(text)
    lines: list[str] = []
    last_is_open_code = whitespace = False
    for is_code, chunk in parts:
        if not is_code:
            prose, changed = _normalise_prose(chunk.split("\n"), fixes)
            lines += prose
            whitespace = whitespace or changed
            last_is_open_code = False
            continue
        block = _clean_code_block(chunk, fixes)
        if block is None:
            continue
        block_lines = block.split("\n")
        lines += block_lines
        last_is_open_code = len(block_lines) == 1 or not _CLOSING_FENCE.match(block_lines[-1])
    while lines and not lines[0].strip():
        lines.pop(0)
        whitespace = True
    while lines and not lines[-1].strip() and not last_is_open_code:  # code to the end is never touched
        lines.pop()
        whitespace = True
    if whitespace and not converted:  # a conversion lays out its own whitespace, counted as html_converted
        fixes[Fix.WHITESPACE] += 1
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ roles and filters


def fix_roles(messages: Sequence[Message], fixes: Counter | None = None) -> list[Message] | SkipReason:
    """Join consecutive same-speaker turns, drop a leading assistant and a trailing user turn, then validate.

    Two joined replies are trained on only when both were (weight 1); the joined reply is truncated when the
    later one was.

    Returns:
        The messages (system?, user, assistant, ... ending with the assistant), or the SkipReason.
    """
    fixes = Counter() if fixes is None else fixes
    out: list[Message] = []
    for i, message in enumerate(messages):
        if message.role is Role.SYSTEM and i > 0 and any(m.role is not Role.SYSTEM for m in messages[:i]):
            return SkipReason.BAD_ROLE_ORDER
        if out and out[-1].role is message.role:
            previous = out[-1]
            out[-1] = Message(message.role, f"{previous.content}\n\n{message.content}".strip(),
                              weight=min(previous.weight, message.weight), truncated=message.truncated)
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


def cut_at_canned_reply(messages: list[Message], fixes: Counter) -> list[Message] | SkipReason:
    """End the conversation before the first canned error reply (and the user turn it answered)."""
    for i, message in enumerate(messages):
        if message.role is Role.ASSISTANT and message.content.lstrip("!").strip().startswith(CANNED_REPLIES):
            kept = messages[:i]
            while kept and kept[-1].role is not Role.ASSISTANT:
                kept.pop()
            if not kept:
                return SkipReason.CANNED_REPLY
            fixes[Fix.CUT_AT_CANNED_REPLY] += 1
            return kept
    return messages


def _prose(messages: Iterable[Message]) -> str:
    return "\n".join(chunk for m in messages for is_code, chunk in split_code_blocks(m.content) if not is_code)


def detect_language(text: str) -> str | None:
    """langdetect's language code for the text, deterministic (seeded); None when it cannot judge.

    It cannot judge a text with fewer than `LANG_MIN_LETTERS` letters, or when its best guess has a probability
    under `LANG_MIN_PROBABILITY` (short greetings are read as Finnish or Catalan otherwise).
    """
    from langdetect import DetectorFactory, detect_langs
    from langdetect.lang_detect_exception import LangDetectException

    if sum(c.isalpha() for c in text) < LANG_MIN_LETTERS:
        return None
    DetectorFactory.seed = 0
    try:
        best = detect_langs(text)[0]
    except LangDetectException:
        return None
    return best.lang if best.prob >= LANG_MIN_PROBABILITY else None


class Cleaner:
    """`clean_conversation` bound to its options, with the blocked-word pattern compiled once (picklable).

    Args:
        options: the filters.
        overlap: an `ds_vicuna.data.overlap.OverlapIndex` of eval questions; conversations sharing an n-gram with
            it are dropped (`eval_overlap`).
    """

    def __init__(self, options: CleanOptions, overlap=None):
        self.options = options
        self.overlap = overlap
        words = sorted({w.strip().lower() for w in options.blocked_words}, key=len, reverse=True)
        self.blocked = (re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, words)) + r")(?!\w)", re.IGNORECASE)
                        if words else None)

    def __call__(self, conv: Conversation) -> tuple[Conversation | SkipReason, Counter]:
        fixes: Counter = Counter()
        return clean_conversation(conv, self, fixes), fixes


def clean_conversation(conv: Conversation, cleaner: Cleaner, fixes: Counter | None = None
                       ) -> Conversation | SkipReason:
    """Clean one conversation (text, canned replies, roles, filters; duplicates are the driver's job).

    Args:
        conv: the conversation as loaded.
        cleaner: the options and their compiled patterns.
        fixes: counts the repairs made (`Fix`) when given.

    Returns:
        The cleaned Conversation, or the SkipReason it is dropped for.
    """
    fixes = Counter() if fixes is None else fixes
    options = cleaner.options
    messages = [Message(m.role, clean_text(m.content, m.role, fixes), weight=m.weight, truncated=m.truncated)
                for m in conv.messages]
    messages = cut_at_canned_reply(messages, fixes)
    if isinstance(messages, SkipReason):
        return messages
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
        if language is None:
            fixes[Fix.LANGUAGE_NOT_JUDGED] += 1
        elif language != options.lang:
            return SkipReason.WRONG_LANGUAGE
    if cleaner.overlap is not None and cleaner.overlap.matches(fixed):
        return SkipReason.EVAL_OVERLAP
    return Conversation(conv.id, fixed)


def content_hash(messages: Sequence[Message]) -> int:
    """A 64-bit hash of the roles, texts and weights (not the id), equal for exact duplicates."""
    payload = json.dumps([[m.role.value, m.content, m.weight, m.truncated] for m in messages], ensure_ascii=False)
    return hash64(payload)


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


def clean_file(source: str | os.PathLike, output: str | os.PathLike, options: CleanOptions = CleanOptions(),
               workers: int | None = None, skip_bad: bool = False, progress: bool = True,
               overlap=None) -> CleanReport:
    """Clean a conversation file into ShareGPT JSONL, streaming (memory does not grow with the file).

    Args:
        source: ShareGPT/OpenAI JSON list or JSONL.
        output: the cleaned JSONL to write.
        options: filters.
        workers: processes (default: every core); the output is the same for any number.
        skip_bad: count unreadable records (and later records reusing an id) instead of raising.
        progress: show a tqdm bar on stderr.
        overlap: an `ds_vicuna.data.overlap.OverlapIndex`: drop conversations that overlap it (`eval_overlap`).

    Returns:
        The report (kept, skipped per reason, fixes per kind).

    Raises:
        FormatError: a bad record without `skip_bad`.
    """
    from tqdm import tqdm

    report = CleanReport(str(source), str(output))
    reader = ConversationReader(source, skip_bad=skip_bad, skips=report.skipped)
    seen = HashSet()
    bar = tqdm(total=reader.size, desc="clean", unit="B", unit_scale=True, disable=not progress)
    processed = 0

    def kept() -> Iterable[Conversation]:
        nonlocal processed
        for result, fixes in ordered_map(Cleaner, (options, overlap), reader, workers or os.cpu_count() or 1):
            processed += 1
            bar.update(reader.bytes_read - bar.n)
            report.fixes.update(fixes)
            if isinstance(result, Conversation) and not seen.add(content_hash(result.messages)):
                result = SkipReason.DUPLICATE
            if isinstance(result, SkipReason):
                report.skipped[result] += 1
            else:
                yield result

    try:
        report.kept = write_conversations(output, kept())
    finally:
        bar.close()
    report.total = processed + sum(n for reason, n in report.skipped.items() if isinstance(reason, BadRecord))
    return report
