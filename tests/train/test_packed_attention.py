"""PACKED_SDPA: each packed conversation attends only to itself, read from position_ids (CPU: one SDPA each)."""
import copy
from types import SimpleNamespace

import pytest
import torch

from ds_vicuna.train.packed_attention import PACKED_SDPA, packed_sdpa_attention, register_packed_sdpa, segment_starts
from tests.support.gpu_device import DEVICE, needs_cuda


def test_segment_starts_follow_position_restarts():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5], [3, 4, 0, 1, 2, 3]])
    assert segment_starts(positions) == [[0, 3, 5], [0], [0, 2]]  # a shard may start mid-conversation


def test_each_conversation_attends_only_to_itself():
    gen = torch.Generator().manual_seed(0)
    lengths = (3, 5, 1, 2)  # the last stands for padding: positions restart at 0
    query, key, value = (torch.randn(2, 4, sum(lengths), 8, generator=gen) for _ in range(3))  # [B, H, T, D]
    positions = torch.cat([torch.arange(n) for n in lengths]).expand(2, -1)  # [B, T]
    module = SimpleNamespace(num_key_value_groups=1, is_causal=True, training=False)
    packed, _ = packed_sdpa_attention(module, query, key, value, None, position_ids=positions,
                                      is_causal=True)  # [B, T, H, D]
    start = 0
    for n in lengths:
        cut = slice(start, start + n)
        alone = torch.nn.functional.scaled_dot_product_attention(query[:, :, cut], key[:, :, cut], value[:, :, cut],
                                                                 is_causal=True)  # [B, H, n, D]
        torch.testing.assert_close(packed[:, cut], alone.transpose(1, 2))
        start += n


def _models(device):
    from transformers import LlamaConfig, LlamaForCausalLM

    register_packed_sdpa()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, use_cache=False)
    ours = LlamaForCausalLM._from_config(copy.deepcopy(config), attn_implementation=PACKED_SDPA).to(device)
    theirs = LlamaForCausalLM._from_config(copy.deepcopy(config), attn_implementation="sdpa").to(device)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _check_same_as_transformers_packed_sdpa(device):
    """Logits and gradients of a packed batch equal transformers' own SDPA on it (block-diagonal mask)."""
    ours, theirs = _models(device)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 96, (2, 24), generator=gen).to(device)  # [B, T]
    positions = torch.tensor([[*range(7), *range(9), *range(8)], [*range(20), *range(4)]], device=device)
    outputs = []
    for model in (ours, theirs):
        logits = model(input_ids=ids, position_ids=positions).logits  # [B, T, V]
        logits.float().pow(2).mean().backward()
        outputs.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (logits, grads), (ref_logits, ref_grads) = outputs
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_same_logits_and_gradients_as_transformers_packed_sdpa():
    _check_same_as_transformers_packed_sdpa("cpu")


@pytest.mark.gpu
def test_same_logits_and_gradients_as_transformers_packed_sdpa_on_gpu():
    _check_same_as_transformers_packed_sdpa(DEVICE)  # the one-kernel mask path


@pytest.mark.slow  # torch.compile of flex_attention: ~1 min on a loaded 2-core CPU
def test_flex_attention_packed_rows_equal_each_conversation_alone_on_cpu(monkeypatch):
    """The forward (loss) of what packed rows use on CUDA, on the CPU: torch 2.13's FlexAttention has no backward
    on CPU ("FlexAttention does not support backward on CPU"), so the gradients are the `gpu` twin's."""
    flex_packed_matches_alone("cpu", monkeypatch, backward=False)


@pytest.mark.gpu
@needs_cuda("flex_attention's backward (torch 2.13: FlexAttention does not support backward on CPU)")
def test_flex_attention_packed_rows_equal_each_conversation_alone_loss_and_every_gradient_gpu(monkeypatch):
    flex_packed_matches_alone(DEVICE, monkeypatch, backward=True)


def flex_packed_matches_alone(device: str, monkeypatch, backward: bool) -> None:
    """What packed rows use on CUDA (ds_vicuna.train.build.pick_training_attention): three conversations packed in
    one padded row under flex_attention's document-causal block mask give the summed loss (and, with `backward`,
    every parameter's gradient) of the three run one at a time (plain causal SDPA, the same weights), fp32, tight
    tolerance; the KV heads are never repeated (GQA in the kernel) and no SDPA call (dense mask) is made."""
    import contextlib

    import transformers.integrations.flex_attention as flex_module

    from ds_vicuna.train.batching import collate
    from ds_vicuna.train.loss import token_loss_sum
    from tests.support.device_checks import LENGTHS, conversations, tiny_llama

    def refuse(*args, **kwargs):
        raise AssertionError("a dense path was taken")

    def on_device(batch):
        return {k: v.to(device) for k, v in batch.items() if k != "num_label_tokens"}

    grad = contextlib.nullcontext() if backward else torch.no_grad()
    convs = conversations()
    alone = tiny_llama(device, torch.float32, attn="sdpa", init_range=0.1)
    packed = tiny_llama(device, torch.float32, attn="flex_attention", init_range=0.1)  # same seed: same weights
    with grad:
        expected = sum(token_loss_sum(alone, on_device(collate([[conv]], "pack", len(conv["input_ids"]),
                                                               pad_token_id=0)), None) for conv in convs)
        batch = on_device(collate([convs], "pack", sum(LENGTHS) + 3, pad_token_id=0))  # 3 padding tokens
        with monkeypatch.context() as patch:
            patch.setattr(flex_module, "repeat_kv", refuse)
            patch.setattr(torch.nn.functional, "scaled_dot_product_attention", refuse)
            loss = token_loss_sum(packed, batch, None)
            if backward:
                loss.backward()
    if backward:
        expected.backward()
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-6, atol=0)
    if backward:
        grads = dict(packed.named_parameters())
        for name, param in alone.named_parameters():
            assert param.grad.abs().sum() > 0, name
            torch.testing.assert_close(grads[name].grad, param.grad, rtol=1e-5, atol=1e-7, msg=name)
