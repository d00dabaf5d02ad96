"""Incremental detokenization (`serve.detokenizer`): never half a character, stop strings cut across tokens and
never leaked, a short decode window per token, and the template's lead dropped once."""
from __future__ import annotations

from ds_vicuna.serve.detokenizer import IncrementalText


def feed(tokenizer, text: str, stop=(), context=(), lead=""):
    inc = IncrementalText(tokenizer, stop, context, lead)
    pieces, hit = [], False
    for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
        piece, hit = inc.add(token)
        pieces.append(piece)
        if hit:
            break
    if not hit:
        pieces.append(inc.finish())
    return pieces, hit


def test_multibyte_characters_are_never_split(smol_tokenizer):
    text = "naïve café 🙂🚀 日本語 done"
    pieces, _ = feed(smol_tokenizer, text)
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert len([p for p in pieces if p]) > 3  # it really streamed in pieces


def test_stop_string_across_tokens_is_cut_and_never_leaked(smol_tokenizer):
    pieces, hit = feed(smol_tokenizer, "Answer: yes\n###END### ignored text", stop=["###END###"])
    assert hit and "".join(pieces) == "Answer: yes\n"
    pieces, hit = feed(smol_tokenizer, "a partial ###EN and more", stop=["###END###"])
    assert not hit and "".join(pieces) == "a partial ###EN and more"


class CountingTokenizer:
    """Wraps a tokenizer and records how many ids each `decode` call got."""

    def __init__(self, tokenizer):
        self.tokenizer, self.lengths = tokenizer, []

    def decode(self, ids, **kwargs):
        self.lengths.append(len(ids))
        return self.tokenizer.decode(ids, **kwargs)


def test_incremental_text_decodes_a_short_window_not_the_whole_reply(smol_tokenizer):
    text = " ".join(f"word{i} café 🙂" for i in range(150))
    ids = smol_tokenizer(text, add_special_tokens=False)["input_ids"]
    counting = CountingTokenizer(smol_tokenizer)
    inc = IncrementalText(counting, [], context_ids=[1, 2, 3, 4, 5, 6, 7])
    out = "".join(inc.add(i)[0] for i in ids) + inc.finish()
    assert out == text and len(ids) > 500
    limit = IncrementalText.CONTEXT + IncrementalText.MAX_PENDING + 1
    assert max(counting.lengths) <= limit  # per token, never the whole reply


def test_reply_decodes_as_it_reads_after_the_prompt_and_the_lead_is_dropped(sp_tokenizer, smol_tokenizer):
    """A sentencepiece tokenizer drops the first token's space when it decodes alone; after the prompt it keeps
    it, so the template's lead (" " after "ASSISTANT:") can be recognised and dropped exactly once."""
    for tokenizer in (sp_tokenizer, smol_tokenizer):
        prompt = tokenizer("hello world ASSISTANT:", add_special_tokens=False)["input_ids"]
        reply = tokenizer("hello world ASSISTANT: the quick  fox", add_special_tokens=False)["input_ids"][len(prompt):]
        inc = IncrementalText(tokenizer, [], prompt)
        assert "".join(inc.add(i)[0] for i in reply) + inc.finish() == " the quick  fox"
        inc = IncrementalText(tokenizer, [], prompt, lead=" ")
        assert "".join(inc.add(i)[0] for i in reply) + inc.finish() == "the quick  fox"  # one space dropped
