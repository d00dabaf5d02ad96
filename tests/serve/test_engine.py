"""Batched generation engine: stop strings and leads, batch == one-at-a-time, chunked prefill, logprobs, and
failure isolation."""
from __future__ import annotations

import math

import pytest
import torch
from tests.support.serve_helpers import collect, drain, fail_forward, force_tokens, random_llama

from ds_vicuna.model.loading import ChatModel
from ds_vicuna.serve.engine import BatchEngine
from ds_vicuna.serve.jobs import GenerationJob, chat_job
from ds_vicuna.serve.sampling import SamplingParams
from ds_vicuna.serve.worker_events import DoneEvent, ErrorEvent, TextEvent


def tiny_chat(tokenizer, template="tokenizer", seed=0) -> ChatModel:
    return ChatModel.build(random_llama(tokenizer, seed), tokenizer, template, name="tiny")


def test_batched_and_joining_rows_match_one_at_a_time(smol_tokenizer):
    """Greedy answers are identical whether prompts of different lengths run together, join later, or run alone."""
    from ds_vicuna.chat.encoding import get_encoder

    encoder = get_encoder(smol_tokenizer, "tokenizer")
    engine = BatchEngine(random_llama(smol_tokenizer), smol_tokenizer, [smol_tokenizer.eos_token_id],
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


def long_prompt(tokenizer, tokens: int) -> list[int]:
    words = " ".join(f"item {i} is blue;" for i in range(tokens))
    return tokenizer(words, add_special_tokens=False)["input_ids"][:tokens]


def test_chunked_prefill_gives_the_same_tokens_and_logprobs(smol_tokenizer):
    model = random_llama(smol_tokenizer)
    prompts = [long_prompt(smol_tokenizer, 300), long_prompt(smol_tokenizer, 40)]
    results = {}
    for chunk in (0, 64, 7):
        engine = BatchEngine(model, smol_tokenizer, [], max_batch_size=4, prefill_chunk=chunk)
        jobs = [GenerationJob(p, SamplingParams(max_tokens=8, temperature=0.0, logprobs=True, echo=True))
                for p in prompts]
        engine.run_batch(jobs)
        results[chunk] = [collect(j) for j in jobs]
    for chunk in (64, 7):
        for (text, done), (text0, done0) in zip(results[chunk], results[0]):
            assert text == text0 and done.completion_tokens == done0.completion_tokens == 8
            got = [lp.logprob for lp in done.prompt_logprobs[1:]]
            want = [lp.logprob for lp in done0.prompt_logprobs[1:]]
            assert got == pytest.approx(want, abs=1e-4)


def test_a_running_stream_keeps_flowing_while_a_long_prompt_is_prefilled(smol_tokenizer):
    """With chunked prefill the running row gets a token every step while the 600-token prompt loads in 64-token
    chunks; with the prompt prefilled in one piece it gets one token in that time."""
    model = random_llama(smol_tokenizer)
    short = smol_tokenizer("Tell me a story", add_special_tokens=False)["input_ids"]
    progress = {}
    for chunk in (64, 0):
        engine = BatchEngine(model, smol_tokenizer, [], max_batch_size=4, prefill_chunk=chunk)  # no stop tokens
        running = GenerationJob(short, SamplingParams(max_tokens=60, temperature=0.0))
        engine.add([running])
        engine.step()
        engine.step()
        before = sum(1 for e in drain(running) if isinstance(e, TextEvent))
        joining = GenerationJob(long_prompt(smol_tokenizer, 600), SamplingParams(max_tokens=4, temperature=0.0))
        engine.add([joining])
        order = []
        while joining.events.empty():
            engine.step()
            order += ["running"] * len([e for e in drain(running) if isinstance(e, TextEvent)])
        order.append("joined")
        progress[chunk] = (before, order)
        while engine.active:
            engine.step()
    _, chunked = progress[64]
    assert chunked.count("running") >= math.ceil(600 / 64) - 1  # a token (at least) per prefill chunk
    assert chunked[-1] == "joined" and chunked[0] == "running"
    _, whole = progress[0]
    assert whole.count("running") <= 1


@pytest.mark.parametrize("chunk", [16, 64])  # the two prompts prefill alone in chunks / together, left-padded
def test_logprobs_are_the_raw_distribution_and_echo_scores_the_prompt(smol_tokenizer, monkeypatch, chunk):
    """Each generated token's logprob (and top alternatives) equal log_softmax of a teacher-forced forward, before
    temperature; echo scores every prompt token (the first has None)."""
    fed: dict[int, list[int]] = {}
    advance = BatchEngine._advance

    def spy(self, row, token_id, logprob):
        fed.setdefault(id(row.job), []).append(token_id)
        return advance(self, row, token_id, logprob)

    monkeypatch.setattr(BatchEngine, "_advance", spy)
    model = random_llama(smol_tokenizer)
    engine = BatchEngine(model, smol_tokenizer, [], prefill_chunk=chunk)
    prompt = long_prompt(smol_tokenizer, 40)
    sampled = GenerationJob(prompt[:25], SamplingParams(max_tokens=6, temperature=0.7, seed=3, logprobs=True,
                                                        top_logprobs=3, echo=True))
    greedy = GenerationJob(prompt, SamplingParams(max_tokens=6, temperature=0.0, logprobs=True))
    engine.run_batch([sampled, greedy])
    for job, top in ((sampled, 3), (greedy, 0)):
        events = drain(job)
        done = events[-1]
        assert isinstance(done, DoneEvent) and done.completion_tokens == 6
        entries = [lp for e in events if isinstance(e, TextEvent) for lp in e.logprobs] + list(done.logprobs)
        generated = fed[id(job)]
        assert len(entries) == len(generated) == 6  # every generated token, once
        with torch.no_grad():
            logits = model(torch.tensor([job.prompt_ids + generated])).logits[0].float()  # [T, V]
        reference = torch.log_softmax(logits, -1)  # [T, V] raw: no temperature
        start = len(job.prompt_ids) - 1
        for k, (entry, token) in enumerate(zip(entries, generated)):
            assert entry.token == smol_tokenizer.decode([token])
            assert entry.logprob == pytest.approx(reference[start + k, token].item(), abs=1e-4)
            assert len(entry.top) == top
            if top:
                values, ids = reference[start + k].topk(top)
                assert [t for t, _ in entry.top] == [smol_tokenizer.decode([i]) for i in ids.tolist()]
                assert [v for _, v in entry.top] == pytest.approx(values.tolist(), abs=1e-4)
        if job is sampled:
            scored, scored_ids = done.prompt_logprobs, job.prompt_ids
            assert len(scored) == len(scored_ids) and scored[0].logprob is None and scored[0].top == ()
            assert [lp.token for lp in scored] == [smol_tokenizer.decode([i]) for i in scored_ids]
            want = [reference[j - 1, scored_ids[j]].item() for j in range(1, len(scored_ids))]
            assert [lp.logprob for lp in scored[1:]] == pytest.approx(want, abs=1e-4)
            assert all(len(lp.top) == 3 for lp in scored[1:])
        else:
            assert done.prompt_logprobs == ()


def test_max_tokens_zero_with_echo_only_scores_the_prompt(smol_tokenizer):
    engine = BatchEngine(random_llama(smol_tokenizer), smol_tokenizer, [])
    prompt = long_prompt(smol_tokenizer, 12)
    job = GenerationJob(prompt, SamplingParams(max_tokens=0, temperature=1.0, logprobs=True, echo=True))
    engine.run_batch([job])
    events = drain(job)
    assert len(events) == 1 and isinstance(events[0], DoneEvent)
    done = events[0]
    assert (done.finish_reason, done.completion_tokens, done.prompt_tokens) == ("length", 0, 12)
    assert len(done.prompt_logprobs) == 12 and all(lp.logprob < 0 for lp in done.prompt_logprobs[1:])


def test_prompt_scoring_reports_a_sampled_stop_token(smol_tokenizer):
    """echo + logprobs + max_tokens=1 (lm-evaluation-harness's loglikelihood request) gets exactly one entry after
    the prompt's even when the sampled token is a stop token; a plain logprobs request does not list it."""
    model = random_llama(smol_tokenizer)
    stop = smol_tokenizer.eos_token_id
    prompt = long_prompt(smol_tokenizer, 10)
    force_tokens(model, {len(prompt): stop})
    engine = BatchEngine(model, smol_tokenizer, [stop])
    scoring = GenerationJob(prompt, SamplingParams(max_tokens=1, temperature=0.0, logprobs=True, echo=True))
    chat = GenerationJob(prompt, SamplingParams(max_tokens=1, temperature=0.0, logprobs=True))
    engine.run_batch([scoring, chat])
    done = {}
    for job in (scoring, chat):
        events = drain(job)
        done[job.params.echo] = events[-1]
        assert isinstance(events[-1], DoneEvent) and (events[-1].finish_reason, events[-1].completion_tokens) == (
            "stop", 0)
        assert not any(isinstance(e, TextEvent) and e.text for e in events)
    assert done[False].logprobs == ()
    (entry,) = done[True].logprobs
    assert entry.token == smol_tokenizer.decode([stop]) and entry.logprob == pytest.approx(0.0, abs=1e-3)
    assert len(done[True].prompt_logprobs) == len(prompt)


def test_chat_reply_drops_the_lead_and_never_contains_the_stop_string(smol_tokenizer):
    """vicuna_v1.1 prompts end "ASSISTANT:"; the model writes " I am Vicuna" then its stop token, or spells the
    stop string out as plain text: either way the client gets "I am Vicuna" and no piece of the stop string."""
    chat = tiny_chat(smol_tokenizer, "vicuna_v1.1")
    assert chat.reply_lead == " " and chat.stop_strings == ["<|im_end|>"]
    prompt = chat.encoder.encode_prompt([{"role": "user", "content": "Who are you?"}])
    reply = smol_tokenizer(" I am Vicuna", add_special_tokens=False)["input_ids"]
    spelled = smol_tokenizer("<|im", add_special_tokens=False)["input_ids"] + \
        smol_tokenizer("_end|> and more", add_special_tokens=False)["input_ids"]
    assert smol_tokenizer.eos_token_id not in spelled
    engine = BatchEngine(chat.model, smol_tokenizer, chat.stop_token_ids)
    for ending in ([smol_tokenizer.eos_token_id], spelled):
        script = {len(prompt) + k: token for k, token in enumerate(reply + ending)}
        handle = force_tokens(chat.model, script)
        job = chat_job(chat, prompt, SamplingParams(max_tokens=30, temperature=0.0))
        engine.run_batch([job])
        handle.remove()
        events = drain(job)
        pieces = [e.text for e in events if isinstance(e, TextEvent)]
        assert "".join(pieces) == "I am Vicuna" and events[-1].finish_reason == "stop"
        assert not any("<" in p for p in pieces)


def test_a_bad_job_fails_alone(smol_tokenizer):
    """A seed torch rejects (2**64) or a sampling error fails only its own job; the batch goes on unchanged."""
    engine = BatchEngine(random_llama(smol_tokenizer), smol_tokenizer, [], max_batch_size=8)
    prompts = [long_prompt(smol_tokenizer, n) for n in (5, 9, 13)]
    alone = []
    for p in prompts:
        job = GenerationJob(p, SamplingParams(max_tokens=5, temperature=0.0))
        engine.run_batch([job])
        alone.append(collect(job))
    bad_seed = GenerationJob(prompts[0], SamplingParams(max_tokens=5, seed=2 ** 64))
    nan_temperature = GenerationJob(prompts[0], SamplingParams(max_tokens=5, temperature=float("nan")))
    good = [GenerationJob(p, SamplingParams(max_tokens=5, temperature=0.0)) for p in prompts]
    engine.run_batch([good[0], bad_seed, good[1], nan_temperature, good[2]])
    assert [collect(j) for j in good] == alone
    for job, param in ((bad_seed, "seed"), (nan_temperature, "temperature")):
        (event,) = drain(job)
        assert isinstance(event, ErrorEvent) and event.code == "invalid_value" and param in event.message


def test_a_failing_row_or_prompt_is_isolated_and_a_failed_step_is_recomputed(smol_tokenizer, monkeypatch):
    model = random_llama(smol_tokenizer)
    prompts = [long_prompt(smol_tokenizer, n) for n in (6, 11, 17)]
    params = [SamplingParams(max_tokens=7, temperature=0.0), SamplingParams(max_tokens=7, temperature=0.9, seed=5),
              SamplingParams(max_tokens=7, temperature=0.0)]
    clean = BatchEngine(model, smol_tokenizer, [])
    expected = []
    for p, s in zip(prompts, params):
        job = GenerationJob(p, s)
        clean.run_batch([job])
        expected.append(collect(job))

    # 1. one decode step fails (a half-written cache): every running row is re-prefilled and goes on unchanged,
    #    seeded sampling included
    calls = {"decode": 0}

    def third_decode(kwargs):
        if kwargs["input_ids"].shape[1] == 1:
            calls["decode"] += 1
            return calls["decode"] == 3
        return False

    handle = fail_forward(model, third_decode)
    jobs = [GenerationJob(p, s) for p, s in zip(prompts, params)]
    BatchEngine(model, smol_tokenizer, [], prefill_chunk=0).run_batch(jobs)
    handle.remove()
    assert calls["decode"] > 3 and [collect(j) for j in jobs] == expected

    # 2. a prompt whose prefill fails: the batch is retried one prompt at a time and only that one fails
    poison = long_prompt(smol_tokenizer, 8) + [7777]
    handle = fail_forward(model, lambda kwargs: bool((kwargs["input_ids"] == 7777).any()))
    jobs = [GenerationJob(p, s) for p, s in zip(prompts, params)]
    bad = GenerationJob(poison, SamplingParams(max_tokens=7, temperature=0.0))
    BatchEngine(model, smol_tokenizer, []).run_batch([jobs[0], bad, jobs[1], jobs[2]])
    handle.remove()
    assert [collect(j) for j in jobs] == expected
    (event,) = drain(bad)
    assert isinstance(event, ErrorEvent) and "injected failure" in event.message

    # 3. sampling that raises for one row ends that row only
    sample = BatchEngine._sample

    def broken_for_seed_5(self, logits, row):
        if row.job.params.seed == 5:
            raise RuntimeError("sampler broke")
        return sample(self, logits, row)

    monkeypatch.setattr(BatchEngine, "_sample", broken_for_seed_5)
    jobs = [GenerationJob(p, s) for p, s in zip(prompts, params)]
    BatchEngine(model, smol_tokenizer, []).run_batch(jobs)
    assert [collect(jobs[0]), collect(jobs[2])] == [expected[0], expected[2]]
    events = drain(jobs[1])
    assert isinstance(events[-1], ErrorEvent) and "sampler broke" in events[-1].message


def test_a_step_that_keeps_failing_ends_its_rows_with_errors_not_hangs(smol_tokenizer):
    model = random_llama(smol_tokenizer)
    handle = fail_forward(model, lambda kwargs: kwargs["input_ids"].shape[1] == 1)  # every decode step fails
    jobs = [GenerationJob(long_prompt(smol_tokenizer, n), SamplingParams(max_tokens=5, temperature=0.0))
            for n in (4, 9)]
    engine = BatchEngine(model, smol_tokenizer, [])
    engine.run_batch(jobs)
    handle.remove()
    assert engine.active == 0
    for job in jobs:
        assert isinstance(drain(job)[-1], ErrorEvent)


def test_tensors_and_generators_follow_the_model_device(smol_tokenizer):
    """Nothing is hard-coded to the CPU: inputs go where the input embeddings are, sampling where the head is."""
    model = random_llama(smol_tokenizer)
    engine = BatchEngine(model, smol_tokenizer, [], prefill_chunk=8)
    job = GenerationJob(long_prompt(smol_tokenizer, 20), SamplingParams(max_tokens=3, temperature=1.0, seed=1))
    engine.add([job])
    engine.step()
    group = engine._prefilling[0]
    assert group.input_ids.device == engine.device == model.get_input_embeddings().weight.device
    assert group.rows[0].generator.device == engine.sample_device
    while engine.active:
        engine.step()
    assert collect(job)[1].completion_tokens == 3
