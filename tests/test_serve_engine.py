"""Batched generation engine: incremental UTF-8-safe text, stop strings, and batch == one-at-a-time."""
from __future__ import annotations

import pytest

from ds_vicuna.serve.engine import BatchEngine, GenerationJob, IncrementalText, SamplingParams


def feed(tokenizer, text: str, stop=()):
    inc = IncrementalText(tokenizer, stop)
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


def collect(job: GenerationJob):
    parts, done = [], None
    while done is None:
        kind, value = job.events.get_nowait()
        if kind == "text":
            parts.append(value)
        elif kind == "done":
            done = value
        else:
            raise AssertionError(value)
    return "".join(parts), done


@pytest.mark.slow
def test_left_padded_batch_matches_one_at_a_time(smol_tokenizer):
    """Greedy answers are identical whether prompts of different lengths run together or alone."""
    from ds_vicuna.serve.worker import load_model

    loaded = load_model("embedded")
    engine = BatchEngine(loaded.model, loaded.tokenizer, loaded.stop_token_ids, max_batch_size=4)
    questions = ["What is the capital of France?", "Hi", "Name three colours of the rainbow, please."]
    prompts = [loaded.encoder.encode_prompt([{"role": "user", "content": q}]) for q in questions]
    params = [SamplingParams(max_tokens=m, temperature=0.0) for m in (6, 3, 8)]
    batch = [GenerationJob(p, s) for p, s in zip(prompts, params)]
    engine.run_batch(batch)
    together = [collect(j) for j in batch]
    alone = []
    for p, s in zip(prompts, params):
        job = GenerationJob(p, s)
        engine.run_batch([job])
        alone.append(collect(job))
    assert together == alone
    assert all(text.strip() for text, _ in together)
    assert [d["completion_tokens"] for _, d in together] == [6, 3, 8] or any(
        d["finish_reason"] == "stop" for _, d in together)
    # seeded sampling is reproducible inside a batch
    seeded = [GenerationJob(prompts[0], SamplingParams(max_tokens=5, temperature=1.0, top_p=0.9, seed=7))
              for _ in range(2)]
    engine.run_batch(seeded)
    assert collect(seeded[0]) == collect(seeded[1])
