"""Read judgment files of every layout into one set of items: the input of summaries, ratings and plots.

    loaded = read_judgments("model_judgment/gpt-4_pair.jsonl", categories={81: "writing", ...})
    loaded.pairs     # PairItem per (question, turn, model pair): its games, each with a winner (and scores)
    loaded.singles   # SingleItem per (question, turn, model): the grade
    loaded.mismatches  # records whose stored verdict or score disagrees with the judge's text

Layouts, detected per record:
- FastChat's `model_judgment` files (`gen_judgment.py`) and ours (`eval judge` writes the same fields plus
  extras): pairwise `g1_winner`/`g2_winner` (or one-game `winner`), single `model` + `score` (-1: none);
- ds-vicuna's older one-record-per-order judgments (`mode` + `order`, model-aligned `score_1`/`score_2`);
- the Vicuna post's GPT-4 reviews, `review_<model1>_<model2>.jsonl` (`text`, stored `score` [s1, s2];
  FastChat stored [-1, -1] when it could not parse).

Text first: every verdict and score is re-read from the judge's text with the parser of the prompt that
produced it (named in the record; FastChat's prompts and the Vicuna prompts are known, others come from
`prompt_sets`). A record whose stored value differs from its text is listed in `mismatches` either way; with
`stored=True` the stored values are used instead (to reproduce published figures made from them, e.g. the
Vicuna post's Table 2, whose question 70 carries hand-corrected scores). A record whose prompt is unknown keeps
its stored values. Duplicate records of one (question, turn, pair or model) keep the first and are counted.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ds_vicuna.eval.judge_prompts import JudgeMode, JudgePrompt, PromptSet, load_prompt_set
from ds_vicuna.data.jsonl import RecordError, iter_jsonl
from ds_vicuna.eval.score_parsing import VICUNA_PAIR, parse_pair_scores, parse_pairwise

LEGACY_NAME = re.compile(r"^review_(?P<m1>[^_]+)_(?P<m2>[^_]+)\.jsonl$")
UNKNOWN_CATEGORY = "unknown"
FIRST, SECOND = "model_1", "model_2"
_GAME_SHOWN_FIRST = (FIRST, SECOND)  # game 1 shows model_1 as A, game 2 shows model_2 as A


@dataclass(frozen=True)
class Game:
    """One judgment of a pair, in one answer order."""

    shown_first: str
    """"model_1" or "model_2": which model was Assistant A (or 1)."""
    winner: str | None
    """"model_1", "model_2", "tie", or None when the judgment has no readable verdict."""
    score_1: float | None = None
    """model_1's score in this game (score prompts only)."""
    score_2: float | None = None


@dataclass
class PairItem:
    question_id: int | str
    turn: int
    category: str
    model_1: str
    model_2: str
    games: list[Game]
    lengths: tuple[int, int] | None = None
    """Characters of the two judged answers (model_1, model_2), when the record carries them."""


@dataclass
class SingleItem:
    question_id: int | str
    turn: int
    category: str
    model: str
    score: float | None
    length: int | None = None


@dataclass(frozen=True)
class Mismatch:
    line: int
    question_id: int | str
    turn: int
    models: tuple[str, ...]
    stored: object
    text: object

    def as_dict(self) -> dict:
        return {"line": self.line, "question_id": self.question_id, "turn": self.turn, "models": list(self.models),
                "stored": _plain(self.stored), "text": _plain(self.text)}


def _plain(value):
    """A Game as {"winner", "scores"} (model-aligned); other values as they are."""
    if isinstance(value, Game):
        return {"winner": value.winner,
                "scores": [value.score_1, value.score_2] if value.score_1 is not None else None}
    return value


@dataclass
class JudgmentFile:
    path: str
    sources: list[str] = field(default_factory=list)
    """Layouts found: "ds-vicuna", "fastchat", "ds-vicuna-per-order", "vicuna-review"."""
    judges: list[str] = field(default_factory=list)
    pairs: list[PairItem] = field(default_factory=list)
    singles: list[SingleItem] = field(default_factory=list)
    mismatches: list[Mismatch] = field(default_factory=list)
    duplicates: int = 0
    stored_kept: int = 0
    """Records kept with their stored values because their prompt is unknown (not re-read from text)."""


class _Reader:
    def __init__(self, path: Path, categories: dict, prompts: dict[str, JudgePrompt], stored: bool):
        self.path, self.categories, self.prompts, self.stored = path, categories, prompts, stored
        self.out = JudgmentFile(str(path))
        self.seen: set = set()
        self.per_order: dict[tuple, PairItem] = {}

    def category(self, record: dict) -> str:
        return record.get("category") or self.categories.get(record["question_id"], UNKNOWN_CATEGORY)

    def source(self, name: str) -> None:
        if name not in self.out.sources:
            self.out.sources.append(name)

    def judge(self, name) -> None:
        if name and name not in self.out.judges:
            self.out.judges.append(name)

    def first(self, key: tuple) -> bool:
        if key in self.seen:
            self.out.duplicates += 1
            return False
        self.seen.add(key)
        return True

    def choose(self, line: int, record: dict, models: tuple, stored, text):
        """The value to use (text-derived unless --stored), recording a disagreement."""
        if stored != text:
            self.out.mismatches.append(Mismatch(line, record["question_id"], record.get("turn", 1), models,
                                                stored, text))
        return stored if self.stored else text


def read_judgments(path: str | Path, categories: dict | None = None, *, stored: bool = False,
                   prompt_sets: Sequence[PromptSet] = ()) -> JudgmentFile:
    """Read one judgment file of any layout (module docstring).

    Args:
        path: the file.
        categories: question_id -> category, for layouts that do not store categories.
        stored: use the stored verdicts and scores instead of re-reading the judge's text.
        prompt_sets: extra judge prompt sets whose prompt names may appear in the file.

    Raises:
        RecordError: an unreadable record (file:line:field), an unknown layout, or a review file whose name
            does not give two models.
    """
    path = Path(path)
    prompts = {p.name: p for s in (load_prompt_set("mt_bench"), load_prompt_set("vicuna"), *prompt_sets)
               for p in s.prompts}
    reader = _Reader(path, categories or {}, prompts, stored)
    rows = list(iter_jsonl(path, allow_torn_tail=True))
    if not rows:
        raise RecordError(f"{path}: no judgments")
    for line, record in rows:
        where = f"{path}:{line}"
        _require(record, where, "question_id")
        if "order" in record and "mode" in record:
            _read_per_order(reader, line, record, where)
        elif "g1_winner" in record or ("winner" in record and "model_1" in record):
            _read_pair(reader, line, record, where)
        elif "model" in record and "score" in record:
            _read_single(reader, line, record, where)
        elif "text" in record and "score" in record:
            _read_review(reader, line, record, where)
        else:
            raise RecordError(f"{where}: not a judgment record of a known layout (keys: {sorted(record)[:8]})")
    reader.out.pairs.extend(reader.per_order.values())
    return reader.out


def _require(record: dict, where: str, *fields: str) -> None:
    for name in fields:
        if name not in record:
            raise RecordError(f"{where}:{name}: missing")


def _judge_of(record: dict) -> tuple[str | None, str | None]:
    """(judge model, prompt name) from FastChat's `judge: [model, prompt]` or our older separate fields."""
    judge = record.get("judge")
    if isinstance(judge, list) and len(judge) == 2:
        return judge[0], judge[1]
    return judge, record.get("prompt")


def _read_pair(reader: _Reader, line: int, record: dict, where: str) -> None:
    _require(record, where, "model_1", "model_2")
    models = (record["model_1"], record["model_2"])
    turn = record.get("turn", 1)
    judge, prompt_name = _judge_of(record)
    reader.source("ds-vicuna" if "key" in record else "fastchat")
    reader.judge(judge)
    if not reader.first((record["question_id"], turn, *models)):
        return
    if "g1_winner" in record:
        _require(record, where, "g2_winner")
        # FastChat's pair records made from two single grades (m1_score/m2_score) hold one verdict twice
        n_games = record.get("games", 1 if "m1_score" in record else 2)
        stored_winners = [record["g1_winner"], record["g2_winner"]][:n_games]
    else:
        n_games, stored_winners = 1, [record["winner"]]
    prompt = reader.prompts.get(prompt_name)
    if prompt is not None and prompt.mode is not JudgeMode.PAIRWISE:
        prompt = None  # FastChat's pair records made from two single grades (m1_score/m2_score): keep the winner
    reader.out.stored_kept += prompt is None
    games = []
    for g in range(n_games):
        stored = _stored_game(record, g, stored_winners[g])
        text = record.get(f"g{g + 1}_judgment")
        if prompt is None or not isinstance(text, str):
            games.append(stored)
            continue
        verdict = parse_pairwise(text, prompt.output_format)
        from_text = _game(_GAME_SHOWN_FIRST[g], verdict.winner if verdict.parsed else None,
                          verdict.score_a, verdict.score_b)
        games.append(reader.choose(line, record, models, stored, from_text))
    lengths = record.get("answer_lengths")
    reader.out.pairs.append(PairItem(record["question_id"], turn, reader.category(record), *models, games,
                                     tuple(lengths) if lengths else None))


def _stored_game(record: dict, g: int, winner: str) -> Game:
    scores = record.get(f"g{g + 1}_scores")
    a, b = (scores if scores else (None, None))
    return _game(_GAME_SHOWN_FIRST[g], None if winner in (None, "error") else winner, a, b, shown_winner=False)


def _game(shown_first: str, winner: str | None, score_a, score_b, shown_winner: bool = True) -> Game:
    """A Game from a judgment read in shown order (A/B winner, A/B scores) or stored model-aligned winner."""
    if shown_winner and winner in ("A", "B"):
        winner = {"A": shown_first, "B": SECOND if shown_first == FIRST else FIRST}[winner]
    if score_a is None:
        return Game(shown_first, winner)
    s1, s2 = (score_a, score_b) if shown_first == FIRST else (score_b, score_a)
    return Game(shown_first, winner, float(s1), float(s2))


def _read_single(reader: _Reader, line: int, record: dict, where: str, source: str | None = None) -> None:
    turn = record.get("turn", 1)
    judge, prompt_name = _judge_of(record)
    reader.source(source or ("ds-vicuna" if "key" in record else "fastchat"))
    reader.judge(judge)
    if not reader.first((record["question_id"], turn, record["model"])):
        return
    stored = record["score"]
    stored = None if stored is None or stored == -1 else float(stored)
    text = record.get("judgment", record.get("text"))
    if prompt_name in reader.prompts and isinstance(text, str):
        grade = reader.prompts[prompt_name].parse(text)
        score = reader.choose(line, record, (record["model"],), stored, grade.score)
    else:
        reader.out.stored_kept += 1
        score = stored
    reader.out.singles.append(SingleItem(record["question_id"], turn, reader.category(record), record["model"],
                                         score, record.get("answer_length")))


def _read_review(reader: _Reader, line: int, record: dict, where: str) -> None:
    match = LEGACY_NAME.match(reader.path.name)
    if not match:
        raise RecordError(f"{reader.path}: a Vicuna review file must be named review_<model1>_<model2>.jsonl "
                          "(model names without '_')")
    models = (match["m1"], match["m2"])
    reader.source("vicuna-review")
    reader.judge(record.get("reviewer_id"))
    if not reader.first((record["question_id"], 1, *models)):
        return
    stored_scores = record["score"]
    stored = None
    if isinstance(stored_scores, list) and len(stored_scores) == 2 and -1 not in stored_scores:
        stored = tuple(float(s) for s in stored_scores)
    parsed = parse_pair_scores(record["text"] if isinstance(record["text"], str) else None)
    text = (parsed.score_1, parsed.score_2) if parsed.parsed else None
    scores = reader.choose(line, record, models, list(stored) if stored else None, list(text) if text else None)
    verdict = parse_pairwise(f"{scores[0]} {scores[1]}", VICUNA_PAIR) if scores else None
    reader.out.pairs.append(PairItem(record["question_id"], 1, reader.category(record), *models,
                                     [_game(FIRST, verdict.winner, *scores) if scores else Game(FIRST, None)]))


def _read_per_order(reader: _Reader, line: int, record: dict, where: str) -> None:
    if record["mode"] == "single":
        return _read_single(reader, line, {**record, "judgment": record.get("text")}, where, "ds-vicuna-per-order")
    reader.source("ds-vicuna-per-order")
    reader.judge(record.get("judge"))
    _require(record, where, "model_1", "model_2", "order")
    models = (record["model_1"], record["model_2"])
    turn = record.get("turn", 1)
    if not reader.first((record["question_id"], turn, *models, record["order"])):
        return
    shown_first = FIRST if record["order"] == "12" else SECOND
    stored = None
    if record.get("parsed") and record.get("score_1") is not None and record.get("score_2") is not None:
        stored = [float(record["score_1"]), float(record["score_2"])]
    parsed = parse_pair_scores(record.get("text"))
    text = None
    if parsed.parsed:
        text = [parsed.score_1, parsed.score_2] if shown_first == FIRST else [parsed.score_2, parsed.score_1]
    scores = reader.choose(line, record, models, stored, text)
    game = Game(shown_first, None)
    if scores:
        winner = parse_pairwise(f"{scores[0]} {scores[1]}", VICUNA_PAIR).winner
        game = Game(shown_first, {"A": FIRST, "B": SECOND, "tie": "tie"}[winner], *scores)
    item = reader.per_order.setdefault((record["question_id"], turn, *models), PairItem(
        record["question_id"], turn, reader.category(record), *models, []))
    item.games.append(game)


def read_many(paths: Sequence[str | Path], categories: dict | None = None, *, stored: bool = False,
              prompt_sets: Sequence[PromptSet] = ()) -> list[JudgmentFile]:
    """`read_judgments` for each path, in order."""
    return [read_judgments(p, categories, stored=stored, prompt_sets=prompt_sets) for p in paths]


def attach_answer_lengths(loaded: JudgmentFile, answers: Sequence[dict]) -> int:
    """Fill in answer lengths (characters of the judged turn) from answer files, for judgment layouts that do not
    record them (FastChat's). `answers`: `answer_files.load_answers` results. Returns how many items got them."""
    turns = {(a.model_id, qid): a.turns for file in answers for qid, a in file.items()}

    def length(model, qid, turn):
        found = turns.get((model, qid))
        return len(found[turn - 1]) if found and len(found) >= turn else None

    filled = 0
    for item in loaded.pairs:
        pair = (length(item.model_1, item.question_id, item.turn), length(item.model_2, item.question_id, item.turn))
        if item.lengths is None and None not in pair:
            item.lengths, filled = pair, filled + 1
    for single in loaded.singles:
        if single.length is None:
            single.length = length(single.model, single.question_id, single.turn)
            filled += single.length is not None
    return filled
