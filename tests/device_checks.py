"""Checks that run on any device: fast CPU tests call them with ("cpu", float32), the `gpu`-marked tests in
tests/test_train_gpu.py with ("cuda", bfloat16) and the tolerance that dtype allows.

    from device_checks import chunked_loss_matches_plain, packed_rows_match_alone
    chunked_loss_matches_plain("cuda", torch.bfloat16, tied=True, tol=2e-2)
"""
from __future__ import annotations

import torch

from ds_vicuna.batching import IGNORE_INDEX, collate, configure_model_for_packing
from ds_vicuna.loss import token_loss_sum

VOCAB = 512
LENGTHS = (7, 5, 9)


def tiny_llama(device: str, dtype: torch.dtype, attn: str = "sdpa", tied: bool = False, seed: int = 0):
    """A random 2-layer Llama (hidden 64, vocab 512) on `device` in `dtype`, KV cache off (packing-ready)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=tied, attn_implementation=attn)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    configure_model_for_packing(model)
    return model


def conversations(lengths=LENGTHS, seed: int = 1) -> list[dict]:
    """Random token conversations; all but the second have a 2-token masked prompt (like real samples)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for k, n in enumerate(lengths):
        ids = torch.randint(3, VOCAB, (n,), generator=gen).tolist()
        labels = ids if k == 1 else [IGNORE_INDEX, IGNORE_INDEX] + ids[2:]
        out.append({"input_ids": ids, "labels": labels})
    return out


def packed_batch(device: str, max_length: int = 16) -> dict:
    """Two packed rows (one padded) of three conversations, on `device`."""
    convs = conversations()
    batch = collate([convs[:2], convs[2:]], "pack", max_length, pad_token_id=0)
    batch.pop("num_label_tokens")
    return {k: v.to(device) for k, v in batch.items()}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in fp32 (0 when both are zero)."""
    actual, expected = actual.float(), expected.float()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


def loss_and_grads(model, batch: dict, chunk_tokens: int | None) -> tuple[torch.Tensor, dict]:
    """token_loss_sum with `chunk_tokens`, backward, and a copy of every parameter's gradient."""
    model.zero_grad(set_to_none=True)
    loss = token_loss_sum(model, batch, chunk_tokens)
    (loss * 0.5).backward()  # a scale, as the trainer applies one (world * accumulation / tokens)
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def chunked_loss_matches_plain(device: str, dtype: torch.dtype, tied: bool, tol: float) -> dict:
    """The chunked loss (chunks of 4 labelled tokens, the last one ragged) gives the plain path's loss and
    gradients for every parameter within `tol` (relative norm error); returns the worst errors seen."""
    model = tiny_llama(device, dtype, tied=tied)
    batch = packed_batch(device)
    plain_loss, plain_grads = loss_and_grads(model, batch, None)
    chunked_loss, chunked_grads = loss_and_grads(model, batch, 4)
    assert "forward" not in model.get_output_embeddings().__dict__  # the output layer is itself again
    assert torch.isfinite(plain_loss) and plain_loss > 0
    assert chunked_loss.dtype == torch.float32 and chunked_loss.shape == ()
    worst = {"loss": abs(float(chunked_loss) - float(plain_loss)) / float(plain_loss)}
    assert worst["loss"] <= tol, worst
    assert chunked_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        assert grad.abs().sum() > 0, name
        worst[name] = relative_error(chunked_grads[name], grad)
        assert worst[name] <= tol, (name, worst[name])
    return worst
