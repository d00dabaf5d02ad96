"""Offline generation (`serve.generate.generate_replies`): the same replies as the engine gives a served job,
and None for a prompt that leaves no room in the context."""
from __future__ import annotations

from tests.support.serve_helpers import collect, random_llama

from ds_vicuna.model.loading import ChatModel
from ds_vicuna.serve.engine import BatchEngine
from ds_vicuna.serve.generate import generate_replies
from ds_vicuna.serve.jobs import chat_job
from ds_vicuna.serve.sampling import SamplingParams

QUESTIONS = [[{"role": "user", "content": "What is the capital of France?"}], [{"role": "user", "content": "Hi"}]]


def test_replies_are_what_a_served_job_answers_and_a_full_context_is_none(smol_tokenizer):
    chat = ChatModel.build(random_llama(smol_tokenizer), smol_tokenizer, "tokenizer", name="tiny")
    replies = generate_replies(chat, QUESTIONS, max_tokens=6)
    engine = BatchEngine(chat.model, chat.tokenizer, chat.stop_token_ids)
    served = []
    for messages in QUESTIONS:
        job = chat_job(chat, chat.encoder.encode_prompt(messages), SamplingParams(6, temperature=0.0))
        engine.run_batch([job])
        served.append(collect(job)[0])
    assert replies == served and all(isinstance(r, str) for r in replies)
    chat.context_length = len(chat.encoder.encode_prompt(QUESTIONS[0]))  # no room for a reply
    assert generate_replies(chat, QUESTIONS[:1], max_tokens=6) == [None]
