"""Scores out of judge text. Pairwise ("8 9") and single-answer ("[[7]]") forms; never a made-up score.

A judgment the parser cannot read returns `parsed=False` with a `ParseFailure` reason; callers keep the raw
text, exclude it from totals and count it. (FastChat scored such judgments as -1, which silently entered sums.)

Pairwise forms, tried in this order:
1. The instructed first line: two numbers, e.g. `8 9`, `8, 9`, `8.5 9`, `(8, 9)`, `Scores: 8/10 9/10`.
2. Labelled scores anywhere, the LAST label of each assistant winning (judges told to reason first write the
   verdict at the end): `Assistant 1: 8 ... Assistant 2: 9`, `Assistant 1 receives a score of 8`.
3. A Python tuple on the last line that has one: `(3, 7)` (FastChat's math prompt asked for a tuple).
Single forms: `[[7]]` (last one), `Rating: [7]`, `Rating: 7/10`.
Scores must lie in [0, 10]; anything else is OUT_OF_RANGE, not clipped.

MT-bench verdicts (FastChat's `[[A]]` output format): the LAST of `[[A]]`, `[[B]]`, `[[C]]` (tie) in the text.
FastChat takes the first one it finds in the order A, B, C, so a judge that quotes the format before its
verdict ("...output [[A]] if...; my verdict: [[B]]") is read as A there and as B here.
Two bracketed scores (`[[rating_a,rating_b]]`): `[[8, 9]]`, else `[8, 9]`, as FastChat's patterns.
`parse_pairwise(text, output_format)` dispatches on a judge prompt's `output_format` and always returns a winner
("A", "B" or "tie"; scores within TIE_DELTA are a tie, as in FastChat).
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass

MIN_SCORE, MAX_SCORE = 0.0, 10.0
TIE_DELTA = 0.1  # FastChat's: two scores this close are a tie
VERDICT = "[[A]]"
RATING = "[[rating]]"
BRACKET_PAIR = "[[rating_a,rating_b]]"
VICUNA_PAIR = "score_a score_b"
PAIRWISE_FORMATS = (VERDICT, BRACKET_PAIR, VICUNA_PAIR)
SINGLE_FORMATS = (RATING,)
_NUM = r"(\d+(?:\.\d+)?)"
_OUT_OF_TEN = r"(?:\s*(?:/|out\s+of)\s*10(?:\.0)?)?"
_FIRST_LINE = re.compile(
    r"^(?:(?:overall\s+)?scores?\s*[:=]?\s*)?[(\[]?\s*" + _NUM + _OUT_OF_TEN
    + r"\s*(?:,|;|\s|\band\b|\bvs\.?)\s*" + _NUM + _OUT_OF_TEN + r"\s*[)\]]?\s*\.?$",
    re.IGNORECASE)
_LABEL = (r"assistant\s*{n}(?:'s)?\s*(?:\*\*|__)?\s*(?:(?:overall\s+|final\s+)?(?:score|rating)\s*)?"
          r"(?:[:=\-–]|\breceives(?:\s+an?\s+(?:overall\s+)?(?:score|rating)\s+of)?|\bgets|\bscores?)\s*"
          r"(?:\*\*|__)?\s*" + _NUM + r"(?!\.\d)(?![\d])")
_LABEL_1 = re.compile(_LABEL.format(n="1"), re.IGNORECASE)
_LABEL_2 = re.compile(_LABEL.format(n="2"), re.IGNORECASE)
_TUPLE = re.compile(r"\(\s*" + _NUM + r"\s*,\s*" + _NUM + r"\s*\)")
_DOUBLE_BRACKET = re.compile(r"\[\[\s*" + _NUM + r"\s*(?:/\s*10)?\s*\]\]")
_RATING = re.compile(r"rating\s*[:=]?\s*(?:\*\*)?\s*\[?\s*" + _NUM + r"\s*(?:/\s*10)?\s*\]?", re.IGNORECASE)
_MARKUP = re.compile(r"[*_`#]+")
_VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]")
_BRACKET_PAIR = re.compile(r"\[\[\s*" + _NUM + r"\s*,\s*" + _NUM + r"\s*\]\]")
_BRACKET_PAIR_BACKUP = re.compile(r"\[\s*" + _NUM + r"\s*,\s*" + _NUM + r"\s*\]")


class ParseFailure(str, enum.Enum):
    """Why a judgment has no score."""

    EMPTY = "empty"  # the judge returned nothing
    NO_SCORES = "no_scores"  # no recognised score form
    OUT_OF_RANGE = "out_of_range"  # a score form with a value outside [0, 10]


@dataclass(frozen=True)
class PairScore:
    parsed: bool
    score_1: float | None = None
    score_2: float | None = None
    failure: ParseFailure | None = None


@dataclass(frozen=True)
class PairVerdict:
    """A pairwise judgment read in the order shown: A = the first answer, B = the second."""

    parsed: bool
    winner: str | None = None
    """"A", "B" or "tie"."""
    score_a: float | None = None
    score_b: float | None = None
    failure: ParseFailure | None = None


@dataclass(frozen=True)
class SingleScore:
    parsed: bool
    score: float | None = None
    failure: ParseFailure | None = None


def parse_pair_scores(text: str | None) -> PairScore:
    """Read the two assistants' scores from a pairwise judgment (forms in the module docstring)."""
    if not text or not text.strip():
        return PairScore(False, failure=ParseFailure.EMPTY)
    for candidate in (_first_line_pair(text), _labelled_pair(text), _tuple_pair(text)):
        if candidate is not None:
            return _checked_pair(*candidate)
    return PairScore(False, failure=ParseFailure.NO_SCORES)


def parse_single_score(text: str | None) -> SingleScore:
    """Read a single-answer grade: the last `[[x]]`, else the last `Rating: x`."""
    if not text or not text.strip():
        return SingleScore(False, failure=ParseFailure.EMPTY)
    matches = _DOUBLE_BRACKET.findall(text) or _RATING.findall(text)
    if not matches:
        return SingleScore(False, failure=ParseFailure.NO_SCORES)
    score = float(matches[-1])
    if not MIN_SCORE <= score <= MAX_SCORE:
        return SingleScore(False, failure=ParseFailure.OUT_OF_RANGE)
    return SingleScore(True, score=score)


def parse_pairwise(text: str | None, output_format: str) -> PairVerdict:
    """Read a pairwise judgment written for a prompt with this `output_format` (see PAIRWISE_FORMATS).

    Raises:
        ValueError: an output format no parser reads.
    """
    if output_format == VERDICT:
        return parse_verdict(text)
    if output_format == BRACKET_PAIR:
        scores = parse_bracket_pair_scores(text)
    elif output_format == VICUNA_PAIR:
        scores = parse_pair_scores(text)
    else:
        raise ValueError(f"no pairwise parser for output_format {output_format!r} (known: {PAIRWISE_FORMATS})")
    if not scores.parsed:
        return PairVerdict(False, failure=scores.failure)
    return PairVerdict(True, winner_of(scores.score_1, scores.score_2), scores.score_1, scores.score_2)


def parse_single(text: str | None, output_format: str) -> SingleScore:
    """Read a single-answer grade written for a prompt with this `output_format` (see SINGLE_FORMATS).

    Raises:
        ValueError: an output format no parser reads.
    """
    if output_format != RATING:
        raise ValueError(f"no single-answer parser for output_format {output_format!r} (known: {SINGLE_FORMATS})")
    return parse_single_score(text)


def winner_of(score_a: float, score_b: float) -> str:
    """"A", "B" or "tie" (within TIE_DELTA) from two scores."""
    if abs(score_a - score_b) <= TIE_DELTA:
        return "tie"
    return "A" if score_a > score_b else "B"


def parse_verdict(text: str | None) -> PairVerdict:
    """Read an MT-bench verdict: the last `[[A]]`, `[[B]]` or `[[C]]` (a tie)."""
    if not text or not text.strip():
        return PairVerdict(False, failure=ParseFailure.EMPTY)
    found = _VERDICT.findall(text)
    if not found:
        return PairVerdict(False, failure=ParseFailure.NO_SCORES)
    return PairVerdict(True, {"A": "A", "B": "B", "C": "tie"}[found[-1]])


def parse_bracket_pair_scores(text: str | None) -> PairScore:
    """Read `[[8, 9]]` (else `[8, 9]`), FastChat's `[[rating_a,rating_b]]` format; the first match counts."""
    if not text or not text.strip():
        return PairScore(False, failure=ParseFailure.EMPTY)
    match = _BRACKET_PAIR.search(text) or _BRACKET_PAIR_BACKUP.search(text)
    return _checked_pair(*match.groups()) if match else PairScore(False, failure=ParseFailure.NO_SCORES)


def _first_line_pair(text: str) -> tuple[str, str] | None:
    first = next(line for line in text.splitlines() if line.strip())
    match = _FIRST_LINE.match(_MARKUP.sub("", first).strip())
    return match.groups() if match else None


def _labelled_pair(text: str) -> tuple[str, str] | None:
    plain = _MARKUP.sub("", text)
    first, second = _LABEL_1.findall(plain), _LABEL_2.findall(plain)
    return (first[-1], second[-1]) if first and second else None


def _tuple_pair(text: str) -> tuple[str, str] | None:
    for line in reversed(text.splitlines()):
        found = _TUPLE.findall(line)
        if found:
            return found[-1]
    return None


def _checked_pair(first: str, second: str) -> PairScore:
    score_1, score_2 = float(first), float(second)
    if not (MIN_SCORE <= score_1 <= MAX_SCORE and MIN_SCORE <= score_2 <= MAX_SCORE):
        return PairScore(False, failure=ParseFailure.OUT_OF_RANGE)
    return PairScore(True, score_1, score_2)
