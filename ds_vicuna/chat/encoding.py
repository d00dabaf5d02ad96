"""Role-masked encoding: messages -> input_ids + labels, exact for any fast (Rust) Hugging Face tokenizer.

How it stays exact by construction, with no offsets or per-tokenizer cases written by hand:
1. The template renders the conversation twice through transformers' own chat-template engine: once with
   the real contents and once with a placeholder per message. The placeholder render tells which
   characters the template wrote and which belong to which message.
2. The text is cut only at control tokens the *template* wrote (BOS, `</s>`, `<|im_end|>` ...). Those become
   their special ids. Special-token text inside a message is never looked up, so a user cannot inject them.
3. Each text region between control tokens is encoded the way Hugging Face encodes a split that follows a
   special token, by a clone of the tokenizer's backend. The clone has one extra non-special "anchor" token
   and treats specials as text. Without special-token text in the messages the ids equal
   `tokenizer.apply_chat_template(...)`, which the tests check.
4. Labels come from character offsets: a token is trained on when it covers characters of a trained
   assistant reply or its stop token. A reply marked `weight=0` stays in the context without labels; the stop
   token after a reply marked `truncated` (cut by `ds-vicuna data split`) is never labeled. A token that would
   mix those with system/user characters raises EncodingError; no sample is ever masked whole or dropped silently.
"""
from __future__ import annotations

import enum
import re
import weakref
from dataclasses import dataclass
from typing import Sequence

from ds_vicuna.chat.messages import Message, MessageLike, Role, as_dicts, validate_messages
from ds_vicuna.chat.templates import ChatTemplate, TemplateError, get_template, special_token_strings

IGNORE_INDEX = -100
TEMPLATE_OWNER = -1  # owner of characters the template wrote (role words, separators, control tokens)
_ANCHOR = "\ue000ds-vicuna-anchor\ue001"
_PLACEHOLDER = "\ue002{}\ue003"
_PLACEHOLDER_RE = re.compile("\ue002(\\d+)\ue003")


class MaskStrategy(str, enum.Enum):
    """Which tokens carry labels."""

    ASSISTANT = "assistant"  # every assistant reply and its stop token (Vicuna's recipe)
    LAST_TURN = "last_turn"  # only the final assistant reply
    ALL = "all"  # every token (plain language modelling)


class EncodingError(ValueError):
    """The conversation cannot be encoded exactly with this tokenizer and template."""


@dataclass(frozen=True)
class Piece:
    """A stretch [start, end) of the rendered text with one owner."""

    start: int
    end: int
    owner: int  # message index, or TEMPLATE_OWNER
    special_id: int | None = None  # set for a control token the template wrote
    stop_of: int | None = None  # message index whose reply this control token ends


@dataclass(frozen=True)
class Layout:
    """The rendered text and who owns each character."""

    text: str
    pieces: tuple[Piece, ...]
    reply_starts: tuple[int, ...] = ()  # where each reply begins: always a token boundary


@dataclass(frozen=True)
class ExplainedEncoding:
    """An encoded conversation with the text it came from and each token's [start, end) in that text."""

    text: str
    input_ids: list[int]
    labels: list[int]
    offsets: list[tuple[int, int]]

    def trained_spans(self) -> list[tuple[int, int]]:
        """Character spans of each maximal run of labeled tokens."""
        spans: list[tuple[int, int]] = []
        previous = False
        for label, (start, end) in zip(self.labels, self.offsets):
            if label != IGNORE_INDEX:
                if previous:
                    spans[-1] = (spans[-1][0], end)
                else:
                    spans.append((start, end))
            previous = label != IGNORE_INDEX
        return spans


class _RegionEncoder:
    """Encodes text exactly as the tokenizer encodes a split after a special token, specials as plain text."""

    def __init__(self, tokenizer):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise EncodingError(f"{type(tokenizer).__name__} is not a fast (Rust) tokenizer; exact role masks need "
                                "character offsets. Load it with AutoTokenizer.from_pretrained(..., use_fast=True)")
        from tokenizers import AddedToken, Tokenizer

        self._tok = Tokenizer.from_str(backend.to_str())
        self._tok.no_truncation()
        self._tok.no_padding()
        self._tok.add_tokens([AddedToken(_ANCHOR, special=False, normalized=False)])
        self._tok.encode_special_tokens = True
        self._anchor_id = self._tok.token_to_id(_ANCHOR)

    def encode(self, text: str, at_start: bool) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and character offsets of `text` (relative to `text`)."""
        if at_start:
            enc = self._tok.encode(text, add_special_tokens=False)
            return list(enc.ids), list(enc.offsets)
        enc = self._tok.encode(_ANCHOR + text, add_special_tokens=False)
        if not enc.ids or enc.ids[0] != self._anchor_id:
            raise EncodingError("tokenizer did not keep the region anchor intact; cannot encode exactly")
        shift = len(_ANCHOR)
        return list(enc.ids[1:]), [(max(s - shift, 0), max(e - shift, 0)) for s, e in enc.offsets[1:]]


class ConversationEncoder:
    """Encodes conversations for one (tokenizer, template) pair; build once, call many times.

    Args:
        tokenizer: a fast Hugging Face tokenizer.
        template: a template name from `ds_vicuna.chat.templates.TEMPLATES` or a ChatTemplate.
    """

    def __init__(self, tokenizer, template: "str | ChatTemplate" = "vicuna_v1.1"):
        self.tokenizer = tokenizer
        self.template = get_template(template)
        self._jinja = self.template.jinja(tokenizer)
        self._specials = special_token_strings(tokenizer)
        missing = [t for t in self.template.required_special_tokens(tokenizer) if t not in self._specials]
        if missing:
            raise TemplateError(
                f"template {self.template.name!r} writes {missing}, which the tokenizer does not have as special "
                f"tokens; call ds_vicuna.add_template_tokens(tokenizer, {self.template.name!r}) and resize the "
                "model's embeddings to len(tokenizer)")
        alternation = "|".join(re.escape(t) for t in sorted(self._specials, key=len, reverse=True))
        self._special_re = re.compile(alternation) if alternation else None
        self._regions = _RegionEncoder(tokenizer)
        self._generation_prompt = self._probe_generation_prompt()

    def _probe_generation_prompt(self) -> str:
        """The text `add_generation_prompt` appends (vicuna: "ASSISTANT:", chatml: "<|im_start|>assistant\\n")."""
        probe = [{"role": "user", "content": _PLACEHOLDER.format(0)}]
        without, with_prompt = self._render(probe, False), self._render(probe, True)
        return with_prompt[len(without):] if with_prompt.startswith(without) else ""

    def _reply_lead(self, template_text: str) -> int:
        """How many trailing characters of the template text before a reply the model generates itself.

        Vicuna's prompt ends "ASSISTANT:" but training text reads "ASSISTANT: reply": at inference the model
        writes that space, so it is labeled as part of the reply.
        """
        cut = template_text.rfind(self._generation_prompt) if self._generation_prompt else -1
        if cut < 0:
            return 0
        lead = template_text[cut + len(self._generation_prompt):]
        if self._special_re is not None and self._special_re.search(lead):
            return 0
        return len(lead)

    # ---- layout -------------------------------------------------------------------------------------
    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self._jinja, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def layout(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> Layout:
        """Render `messages` and attribute every character to the template or to one message."""
        real = as_dicts(messages)
        text = self._render(real, add_generation_prompt)
        skeleton = self._render([{"role": m["role"], "content": _PLACEHOLDER.format(i)} for i, m in enumerate(real)],
                                add_generation_prompt)
        parts = _PLACEHOLDER_RE.split(skeleton)  # [template, index, template, index, ..., template]
        order = [int(i) for i in parts[1::2]]
        if order != list(range(len(real))):
            raise EncodingError(f"template {self.template.name!r} does not render every message once, in order "
                                f"(rendered message indices {order}); its masks cannot be built exactly")
        pieces, rebuilt, pos = [], [], 0
        for k, template_text in enumerate(parts[0::2]):
            follows = order[k - 1] if k > 0 else None
            stop_owner = follows if follows is not None and real[follows]["role"] == Role.ASSISTANT.value else None
            reply = k < len(order) and real[order[k]]["role"] == Role.ASSISTANT.value
            lead = self._reply_lead(template_text) if reply else 0
            pos = self._add_template_text(template_text[:len(template_text) - lead], pos, stop_owner, pieces, rebuilt)
            if lead:
                pieces.append(Piece(pos, pos + lead, order[k]))
                rebuilt.append(template_text[len(template_text) - lead:])
                pos += lead
            if k < len(order):
                content = real[order[k]]["content"]
                pieces.append(Piece(pos, pos + len(content), order[k]))
                rebuilt.append(content)
                pos += len(content)
        if "".join(rebuilt) != text:  # the template rewrote content (trim, escape): no exact attribution
            raise EncodingError(f"template {self.template.name!r} changes message text while rendering (trims or "
                                "rewrites it), so characters cannot be attributed exactly; use vicuna_v1.1 or chatml")
        reply_starts = []
        for piece in pieces:
            if piece.owner != TEMPLATE_OWNER and real[piece.owner]["role"] == Role.ASSISTANT.value:
                if not reply_starts or reply_starts[-1][0] != piece.owner:
                    reply_starts.append((piece.owner, piece.start))
        return Layout(text, tuple(pieces), tuple(start for _, start in reply_starts))

    def _add_template_text(self, text: str, pos: int, stop_owner: int | None, pieces: list, rebuilt: list) -> int:
        """Cut template-written text at control tokens; a control token right after a reply is its stop."""
        cursor = 0
        for match in (self._special_re.finditer(text) if self._special_re else ()):
            if match.start() > cursor:
                pieces.append(Piece(pos + cursor, pos + match.start(), TEMPLATE_OWNER))
            stop_of = stop_owner if match.start() == 0 else None
            pieces.append(Piece(pos + match.start(), pos + match.end(), TEMPLATE_OWNER,
                                special_id=self._specials[match.group()], stop_of=stop_of))
            cursor = match.end()
        if cursor < len(text):
            pieces.append(Piece(pos + cursor, pos + len(text), TEMPLATE_OWNER))
        rebuilt.append(text)
        return pos + len(text)

    # ---- tokens -------------------------------------------------------------------------------------
    def _tokens(self, layout: Layout) -> tuple[list[int], list[tuple[int, int]], list[Piece | None]]:
        """Ids and offsets for the whole text; for control tokens also the Piece they came from.

        Regions end at control tokens and where a reply starts. The cut at a reply start makes the tokens
        before it exactly the serving prompt's: no token may straddle the prompt and what the model generates.
        """
        ids, offsets, controls = [], [], []
        cuts = [(p.start, p) for p in layout.pieces if p.special_id is not None]
        cuts += [(start, None) for start in layout.reply_starts] + [(len(layout.text), None)]
        cursor = 0
        for position, control in sorted(cuts, key=lambda cut: (cut[0], cut[1] is not None)):
            if position > cursor:
                region_ids, region_offsets = self._regions.encode(layout.text[cursor:position], at_start=cursor == 0)
                ids += region_ids
                offsets += [(cursor + s, cursor + e) for s, e in region_offsets]
                controls += [None] * len(region_ids)
                cursor = position
            if control is not None:
                ids.append(control.special_id)
                offsets.append((control.start, control.end))
                controls.append(control)
                cursor = control.end
        return ids, offsets, controls

    def encode(self, messages: Sequence[MessageLike], max_length: int | None = None,
               mask: MaskStrategy = MaskStrategy.ASSISTANT) -> dict[str, list[int]]:
        """Encode a conversation for training.

        Args:
            messages: system?, user, assistant, user, assistant, ...
            max_length: keep at most this many tokens (the split stage avoids cutting; this is the guard).
            mask: which tokens carry labels.

        Returns:
            {"input_ids": [...], "labels": [...]} of equal length; labels are IGNORE_INDEX off the trained spans.

        Raises:
            MessageError: bad structure. EncodingError: a token that mixes user and assistant text.
        """
        encoded = self.explain(messages, mask)
        ids, labels = encoded.input_ids, encoded.labels
        if max_length is not None:
            ids, labels = ids[:max_length], labels[:max_length]
        return {"input_ids": ids, "labels": labels}

    def explain(self, messages: Sequence[MessageLike],
                mask: MaskStrategy = MaskStrategy.ASSISTANT) -> "ExplainedEncoding":
        """Like `encode`, plus the rendered text and each token's character span (to inspect masks)."""
        msgs = validate_messages(messages)
        layout = self.layout(msgs)
        ids, offsets, controls = self._tokens(layout)
        trained = _trained_messages(msgs, MaskStrategy(mask))
        untrained = {i for i, m in enumerate(msgs) if m.role is Role.ASSISTANT and not m.trained}
        owner = _owner_per_char(layout)
        labels = []
        for tid, (start, end), control in zip(ids, offsets, controls):
            if control is not None and control.stop_of is not None and msgs[control.stop_of].truncated:
                labels.append(IGNORE_INDEX)  # the reply was cut to fit: it does not end here
                continue
            owners = set(owner[start:end]) if end > start else {owner[min(start, len(owner) - 1)]}
            if mask == MaskStrategy.ALL:  # every token, except replies marked weight 0
                labels.append(IGNORE_INDEX if control is None and owners & untrained
                              or control is not None and control.stop_of in untrained else tid)
                continue
            if control is not None:
                labels.append(tid if control.stop_of in trained else IGNORE_INDEX)
                continue
            if owners & trained:
                protected = {o for o in owners if o != TEMPLATE_OWNER and o not in trained
                             and msgs[o].role is not Role.ASSISTANT}
                if protected:
                    raise EncodingError(
                        f"token {layout.text[start:end]!r} spans assistant text and {msgs[min(protected)].role.value} "
                        f"text (messages {sorted(owners - {TEMPLATE_OWNER})}); the template gives no boundary there")
                labels.append(tid)
            else:
                labels.append(IGNORE_INDEX)
        assert len(labels) == len(ids) == len(offsets)
        return ExplainedEncoding(layout.text, ids, labels, offsets)

    def count_tokens(self, messages: Sequence[MessageLike]) -> int:
        """`len(encode(messages)["input_ids"])`, without building labels (what splitting measures with)."""
        ids, _, _ = self._tokens(self.layout(validate_messages(messages)))
        return len(ids)

    def encode_prompt(self, messages: Sequence[MessageLike]) -> list[int]:
        """Token ids the model sees at inference: the conversation so far plus the assistant header."""
        msgs = validate_messages(messages, require_final_user=True)
        ids, _, _ = self._tokens(self.layout(msgs, add_generation_prompt=True))
        return ids

    def render_prompt(self, messages: Sequence[MessageLike]) -> str:
        """The prompt text `encode_prompt` encodes (for logs and the /v1/completions echo)."""
        msgs = validate_messages(messages, require_final_user=True)
        return self.layout(msgs, add_generation_prompt=True).text

    def stop_strings(self) -> list[str]:
        return self.template.stop_strings(self.tokenizer)


def _trained_messages(messages: list[Message], mask: MaskStrategy) -> set[int]:
    """Assistant replies that carry labels: weight 0 replies never do; last_turn keeps only the final reply."""
    replies = [i for i, m in enumerate(messages) if m.role is Role.ASSISTANT]
    if mask == MaskStrategy.LAST_TURN:
        replies = replies[-1:]
    return {i for i in replies if messages[i].trained}


def _owner_per_char(layout: Layout) -> list[int]:
    owner = [TEMPLATE_OWNER] * len(layout.text)
    for piece in layout.pieces:
        if piece.owner != TEMPLATE_OWNER:
            owner[piece.start:piece.end] = [piece.owner] * (piece.end - piece.start)
        elif piece.stop_of is not None:
            owner[piece.start:piece.end] = [piece.stop_of] * (piece.end - piece.start)
    return owner


_ENCODERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def get_encoder(tokenizer, template: "str | ChatTemplate" = "vicuna_v1.1") -> ConversationEncoder:
    """A ConversationEncoder cached per tokenizer object (building one clones the tokenizer's backend)."""
    name = get_template(template).name
    per_tokenizer = _ENCODERS.setdefault(tokenizer, {})
    if name not in per_tokenizer or not isinstance(template, str):
        per_tokenizer[name] = ConversationEncoder(tokenizer, template)
    return per_tokenizer[name]


def encode_conversation(messages: Sequence[MessageLike], tokenizer, template: "str | ChatTemplate" = "vicuna_v1.1",
                        max_length: int | None = None,
                        mask: MaskStrategy = MaskStrategy.ASSISTANT) -> dict[str, list[int]]:
    """Encode one conversation into input_ids and role-masked labels (see ConversationEncoder.encode)."""
    return get_encoder(tokenizer, template).encode(messages, max_length=max_length, mask=mask)


def encode_prompt(messages: Sequence[MessageLike], tokenizer,
                  template: "str | ChatTemplate" = "vicuna_v1.1") -> list[int]:
    """Encode the inference prompt for `messages` (ending with the user's turn)."""
    return get_encoder(tokenizer, template).encode_prompt(messages)
