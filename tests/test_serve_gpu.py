"""Serving on a CUDA GPU: the worker in bf16 answers greedy requests with `model.generate`'s text, batched and one
at a time; tensors, generators and the dtype policy on the device; one model spread over two GPUs.

    make gpu-check            # or: .venv/bin/python -m pytest -m gpu -ra

Skipped with the reason printed on a machine without CUDA (tests/conftest.py).
"""
from __future__ import annotations

import pytest
import torch

from ds_vicuna.serve.protocol import DoneEvent, TextEvent

pytestmark = pytest.mark.gpu

QUESTIONS = ["What is the capital of France?", "Name the largest planet in the solar system.",
             "What is 2 + 2?", "Which ocean is the largest?", "Translate 'thank you' into French.",
             "What colour is the sky on a clear day?", "Who wrote Romeo and Juliet?",
             "How many legs does a spider have?"]
MAX_TOKENS = 24
MIN_MARGIN = 0.5  # logits: a greedy step closer than this is a near-tie bf16 rounding may flip either way


@pytest.fixture(scope="module")
def chat():
    from ds_vicuna.chat_model import load_chat_model

    return load_chat_model("embedded", device="cuda", dtype="bf16")


def reference(chat, question: str) -> tuple[str, float]:
    """Greedy `model.generate` alone: (reply text as the worker would send it, smallest top-1/top-2 logit gap)."""
    messages = [{"role": "user", "content": question}]
    prompt = torch.tensor([chat.encoder.encode_prompt(messages)], device=chat.device)  # [1, T]
    with torch.no_grad():
        out = chat.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=MAX_TOKENS,
                                  do_sample=False, eos_token_id=chat.stop_token_ids,
                                  pad_token_id=chat.stop_token_ids[0], output_logits=True,
                                  return_dict_in_generate=True)
    new = out.sequences[0, prompt.shape[1]:].tolist()
    new = new[:next((i for i, t in enumerate(new) if t in chat.stop_token_ids), len(new))]
    margins = [float(step[0].float().topk(2).values.diff().abs()) for step in out.logits[:len(new) + 1]]
    text = chat.tokenizer.decode(prompt[0, -3:].tolist() + new, skip_special_tokens=True)
    text = text[len(chat.tokenizer.decode(prompt[0, -3:].tolist(), skip_special_tokens=True)):]
    return text.removeprefix(chat.reply_lead), min(margins)


def reply(worker, job) -> str:
    parts = []
    for event in worker.stream(job, poll=0.5):
        if isinstance(event, TextEvent):
            parts.append(event.text)
        else:
            assert isinstance(event, DoneEvent), event
    return "".join(parts)


def test_the_model_is_on_the_gpu_in_the_auto_dtype():
    from ds_vicuna.chat_model import load_chat_model

    chat = load_chat_model("embedded", device="cuda", dtype="auto")
    bf16 = torch.cuda.get_device_capability(chat.device)[0] >= 8
    assert chat.device.type == "cuda" and chat.dtype == (torch.bfloat16 if bf16 else torch.float16)
    assert {p.device for p in chat.model.parameters()} == {chat.device}
    assert chat.model.config._attn_implementation == "sdpa"


def test_worker_in_bf16_matches_generate_batched_and_one_at_a_time(chat):
    from ds_vicuna.serve.worker import Worker

    expected = {q: reference(chat, q) for q in QUESTIONS}
    stable = [q for q in QUESTIONS if expected[q][1] >= MIN_MARGIN]  # no near-tie anywhere on the greedy path
    assert len(stable) >= 4, {q: m for q, (_, m) in expected.items()}
    worker = Worker(chat, "http://127.0.0.1:1", None, http=None, max_batch_size=8)
    worker.start()
    try:
        def job(question):
            return worker.make_job({"messages": [{"role": "user", "content": question}],
                                    "params": {"max_tokens": MAX_TOKENS, "temperature": 0}})

        for question in stable:  # one at a time
            one = job(question)
            worker.submit(one)
            assert reply(worker, one) == expected[question][0], question
        jobs = [job(q) for q in stable]  # all at once: one left-padded batch
        for j in jobs:
            worker.submit(j)
        assert [reply(worker, j) for j in jobs] == [expected[q][0] for q in stable]
        assert worker.engine.device.type == "cuda" and worker.healthy
    finally:
        worker.stop()


def test_seeded_sampling_logprobs_and_chunked_prefill_on_the_gpu(chat):
    from ds_vicuna.serve.engine import BatchEngine, GenerationJob, SamplingParams

    prompt = chat.encoder.encode_prompt([{"role": "user", "content": " ".join(QUESTIONS * 20)}])  # ~1.5k tokens
    texts = []
    for chunk in (0, 256):
        engine = BatchEngine(chat.model, chat.tokenizer, chat.stop_token_ids, prefill_chunk=chunk)
        jobs = [GenerationJob(prompt, SamplingParams(max_tokens=16, temperature=0.8, seed=11, logprobs=True,
                                                     top_logprobs=2, echo=True)) for _ in range(2)]
        engine.run_batch(jobs)
        events = [[jobs[i].events.get_nowait() for _ in range(jobs[i].events.qsize())] for i in range(2)]
        assert all(isinstance(e[-1], DoneEvent) for e in events)
        assert events[0][-1].prompt_logprobs and len(events[0][-1].prompt_logprobs) == len(prompt)
        texts.append(["".join(e.text for e in ev if isinstance(e, TextEvent)) for ev in events])
        assert texts[-1][0] == texts[-1][1]  # the same seed on the GPU generator: the same text
        assert engine.rows == [] and engine.sample_device.type == "cuda"


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_one_model_spread_over_two_gpus_answers_like_one_gpu():
    from ds_vicuna.chat_model import load_chat_model
    from ds_vicuna.serve.engine import generate_replies

    conversations = [[{"role": "user", "content": q}] for q in QUESTIONS[:3]]
    single = load_chat_model("embedded", device="cuda:0", dtype="fp32")
    spread = load_chat_model("embedded", device_map="balanced", dtype="fp32")
    assert len(set(spread.model.hf_device_map.values())) >= 2
    assert generate_replies(spread, conversations, 16) == generate_replies(single, conversations, 16)
