"""Small models and helpers for the engine and worker tests (no weights are downloaded).

    model = random_llama(tokenizer)                  # a random 2-layer Llama over the tokenizer's vocabulary
    force_tokens(model, {12: id_a, 13: id_b})       # the token at position 12 is id_a, at 13 id_b (greedy)
    text, done = collect(job)                        # a finished job's text and its DoneEvent
"""
from __future__ import annotations

from ds_vicuna.serve.worker_events import DoneEvent, ErrorEvent, TextEvent


def random_llama(tokenizer, seed: int = 0, max_positions: int = 1024):
    """A random 2-layer Llama over `tokenizer`'s vocabulary: exact batching checks need any model, not a good one."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions)
    return LlamaForCausalLM(config).eval()


def force_tokens(model, script: dict[int, int]):
    """Make greedy decoding write `script[p]` as the token at absolute position p (other positions untouched).

    A forward hook rewrites the last logits of each row whose next position is in `script`, so the real KV cache,
    batching and chunked prefill all run as usual. Returns the hook handle.
    """
    import torch

    def hook(module, args, kwargs, output):
        positions = kwargs["position_ids"][:, -1]  # [B]
        for row, position in enumerate(positions.tolist()):
            token = script.get(position + 1)
            if token is not None:
                logits = torch.full_like(output.logits[row, -1], -1e4)
                logits[token] = 1e4
                output.logits[row, -1] = logits
        return output

    return model.register_forward_hook(hook, with_kwargs=True)


def fail_forward(model, when):
    """Make the model's forward raise RuntimeError("injected failure") whenever `when(kwargs)` is true."""
    def hook(module, args, kwargs):
        if when(kwargs):
            raise RuntimeError("injected failure")

    return model.register_forward_pre_hook(hook, with_kwargs=True)


def drain(job) -> list:
    """Every event a job has queued so far."""
    events = []
    while not job.events.empty():
        events.append(job.events.get_nowait())
    return events


def collect(job):
    """(text, DoneEvent) of a finished job; raises AssertionError on an ErrorEvent or a missing end."""
    parts, done = [], None
    for event in drain(job):
        assert done is None, "events after the final one"
        if isinstance(event, TextEvent):
            parts.append(event.text)
        elif isinstance(event, DoneEvent):
            done = event
        else:
            assert not isinstance(event, ErrorEvent), event
    assert done is not None, "the job did not finish"
    return "".join(parts), done
