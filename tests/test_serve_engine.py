"""Batched generation engine: incremental UTF-8-safe text, stop strings, and batch == one-at-a-time."""
from __future__ import annotations

from ds_vicuna.serve.engine import BatchEngine, GenerationJob, IncrementalText, SamplingParams
from ds_vicuna.serve.protocol import DoneEvent, TextEvent


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
        event = job.events.get_nowait()
        if isinstance(event, TextEvent):
            parts.append(event.text)
        elif isinstance(event, DoneEvent):
            done = event
        else:
            raise AssertionError(event)
    return "".join(parts), done


def tiny_llama(tokenizer):
    """A random 2-layer Llama over the SmolLM2 vocabulary: exact batching checks need any model, not a good one."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return LlamaForCausalLM(config).eval()


def test_batched_and_joining_rows_match_one_at_a_time(smol_tokenizer):
    """Greedy answers are identical whether prompts of different lengths run together, join later, or run alone."""
    from ds_vicuna.encoding import get_encoder

    encoder = get_encoder(smol_tokenizer, "tokenizer")
    engine = BatchEngine(tiny_llama(smol_tokenizer), smol_tokenizer, [smol_tokenizer.eos_token_id],
                         max_batch_size=4)
    questions = ["What is the capital of France?", "Hi", "Name three colours of the rainbow, please."]
    prompts = [encoder.encode_prompt([{"role": "user", "content": q}]) for q in questions]
    params = [SamplingParams(max_tokens=m, temperature=0.0) for m in (6, 3, 8)]  # different lengths
    batch = [GenerationJob(p, s) for p, s in zip(prompts, params)]
    engine.run_batch(batch)
    together = [collect(j) for j in batch]
    alone = []
    for p, s in zip(prompts, params):
        job = GenerationJob(p, s)
        engine.run_batch([job])
        alone.append(collect(job))
    assert together == alone
    # continuous batching: jobs that join a running batch between steps get the same greedy answers
    staggered = [GenerationJob(p, s) for p, s in zip(prompts, params)]
    engine.add([staggered[2]])
    engine.step()
    engine.step()
    engine.add(staggered[:2])
    assert engine.active == 3
    while engine.active:
        engine.step()
    assert [collect(j) for j in staggered] == alone
    assert [d.completion_tokens for _, d in together] == [6, 3, 8]
    assert all(d.finish_reason == "length" for _, d in together)
    # seeded sampling is reproducible inside a batch
    seeded = [GenerationJob(prompts[0], SamplingParams(max_tokens=5, temperature=1.0, top_p=0.9, seed=7))
              for _ in range(2)]
    engine.run_batch(seeded)
    assert collect(seeded[0]) == collect(seeded[1])
