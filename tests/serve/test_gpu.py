"""Serving on a CUDA GPU: the worker in bf16 answers greedy requests with `model.generate`'s text, batched and one
at a time; tensors, generators and the dtype policy on the device; one model spread over two GPUs.

The model is a random-weight Llama over the bundled SmolLM2 tokenizer (`ds_vicuna.model.random_weights`; the GPU
machine gets tokenizer files only, never the embedded model's weights); weights drawn with std 0.2 so greedy
decoding has clear winners. `make gpu-rehearsal` runs these on the CPU (tests/support/gpu_device.py).

bf16 rounds differently in a padded batch than alone, so two greedy paths may part where the top two tokens are
nearly tied: a reply may leave generate's only there (each side's token in the other's top 5, the rule vLLM's
tests use), and most replies must be generate's text exactly.

    make gpu-test             # or: .venv/bin/python -m pytest -m gpu -ra

Skipped with the reason printed on a machine without CUDA (tests/conftest.py).
"""
from __future__ import annotations

import pytest
import torch

from ds_vicuna.serve.worker_events import DoneEvent, TextEvent
from tests.support.gpu_device import DEVICE, needs_gpus

pytestmark = pytest.mark.gpu

QUESTIONS = ["What is the capital of France?", "Name the largest planet in the solar system.",
             "What is 2 + 2?", "Which ocean is the largest?", "Translate 'thank you' into French.",
             "What colour is the sky on a clear day?", "Who wrote Romeo and Juliet?",
             "How many legs does a spider have?"]
MAX_TOKENS = 24
TOP = 5
SHAPE = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 2}  # small, and enough layers for device_map="balanced" to spread over two GPUs


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from ds_vicuna.model.random_weights import bundled_tokenizer_dir, write_random_llama

    return write_random_llama(tmp_path_factory.mktemp("serve_gpu") / "model", bundled_tokenizer_dir(), SHAPE,
                              dtype="fp32", device="cpu", init_range=0.2)


@pytest.fixture(scope="module")
def chat(model_dir):
    from ds_vicuna.model.loading import load_chat_model

    return load_chat_model(model_dir, device=DEVICE, dtype="bf16")


def reference(chat, question: str) -> tuple[str, list[str], list[list[str]]]:
    """Greedy `model.generate` alone: the reply text as the worker sends it, its tokens, each step's top tokens."""
    messages = [{"role": "user", "content": question}]
    prompt = torch.tensor([chat.encoder.encode_prompt(messages)], device=chat.device)  # [1, T]
    with torch.no_grad():
        out = chat.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=MAX_TOKENS,
                                  do_sample=False, eos_token_id=chat.stop_token_ids,
                                  pad_token_id=chat.stop_token_ids[0], output_logits=True,
                                  return_dict_in_generate=True)
    new = out.sequences[0, prompt.shape[1]:].tolist()
    new = new[:next((i for i, t in enumerate(new) if t in chat.stop_token_ids), len(new))]
    context = prompt[0, -3:].tolist()
    text = chat.tokenizer.decode(context + new, skip_special_tokens=True)
    text = text[len(chat.tokenizer.decode(context, skip_special_tokens=True)):].removeprefix(chat.reply_lead)
    tops = [[chat.tokenizer.decode([i]) for i in step[0].float().topk(TOP).indices.tolist()] for step in out.logits]
    return text, [chat.tokenizer.decode([i]) for i in new], tops


def reply(worker, job) -> tuple[str, list]:
    """(text, logprob entries) of a submitted job."""
    parts, entries = [], []
    for event in worker.stream(job, poll=0.5):
        assert isinstance(event, (TextEvent, DoneEvent)), event
        entries += event.logprobs
        if isinstance(event, TextEvent):
            parts.append(event.text)
    return "".join(parts), entries


def same_or_near_tie(got: tuple[str, list], want: tuple[str, list[str], list[list[str]]]) -> bool:
    """True when the worker's reply is generate's; False when they part at a near-tie (each side's token among the
    other's top 5 there, as vLLM's `check_logprobs_close` accepts); anything else fails the test."""
    text, entries = got
    want_text, want_tokens, want_tops = want
    for k, (entry, token) in enumerate(zip(entries, want_tokens)):
        if entry.token != token:
            assert entry.token in want_tops[k] and token in [t for t, _ in entry.top], (k, entry, token)
            return False
    assert len(entries) == len(want_tokens) and text == want_text, (text, want_text)
    return True


def test_the_model_is_on_the_gpu_in_the_auto_dtype(model_dir):
    from ds_vicuna.model.loading import load_chat_model

    chat = load_chat_model(model_dir, device=DEVICE, dtype="auto")
    if DEVICE == "cuda":
        bf16 = torch.cuda.get_device_capability(chat.device)[0] >= 8
        assert chat.dtype == (torch.bfloat16 if bf16 else torch.float16)
    assert chat.device.type == DEVICE and chat.dtype in (torch.bfloat16, torch.float16, torch.float32)
    assert {p.device for p in chat.model.parameters()} == {chat.device}
    assert chat.model.config._attn_implementation == "sdpa"


def test_worker_in_bf16_matches_generate_batched_and_one_at_a_time(chat):
    from ds_vicuna.serve.worker import Worker

    expected = [reference(chat, q) for q in QUESTIONS]
    worker = Worker(chat, "http://127.0.0.1:1", None, http=None, max_batch_size=8)
    worker.start()
    try:
        def job(question):
            return worker.make_job({"messages": [{"role": "user", "content": question}],
                                    "params": {"max_tokens": MAX_TOKENS, "temperature": 0, "logprobs": True,
                                               "top_logprobs": TOP}})

        alone = []
        for question in QUESTIONS:  # one at a time
            one = job(question)
            worker.submit(one)
            alone.append(reply(worker, one))
        jobs = [job(q) for q in QUESTIONS]  # all at once: one left-padded batch
        for j in jobs:
            worker.submit(j)
        together = [reply(worker, j) for j in jobs]
        for replies in (alone, together):
            same = [same_or_near_tie(got, want) for got, want in zip(replies, expected)]
            assert sum(same) >= len(QUESTIONS) // 2, same  # most replies are generate's text exactly
        assert worker.engine.device.type == DEVICE and worker.healthy
    finally:
        worker.stop()


def test_seeded_sampling_logprobs_and_chunked_prefill_on_the_gpu(chat):
    from ds_vicuna.serve.engine import BatchEngine
    from ds_vicuna.serve.jobs import GenerationJob
    from ds_vicuna.serve.sampling import SamplingParams

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
        assert engine.rows == [] and engine.sample_device.type == DEVICE


@needs_gpus(2)
def test_one_model_spread_over_two_gpus_answers_like_one_gpu(model_dir):
    from ds_vicuna.model.loading import load_chat_model
    from ds_vicuna.serve.generate import generate_replies

    conversations = [[{"role": "user", "content": q}] for q in QUESTIONS[:3]]
    single = load_chat_model(model_dir, device="cuda:0", dtype="fp32")
    spread = load_chat_model(model_dir, device_map="balanced", dtype="fp32")
    assert len(set(spread.model.hf_device_map.values())) >= 2
    assert generate_replies(spread, conversations, 16) == generate_replies(single, conversations, 16)
