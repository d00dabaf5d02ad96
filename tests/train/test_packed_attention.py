"""PACKED_SDPA: each packed conversation attends only to itself, read from position_ids (CPU: one SDPA each)."""
import copy
from types import SimpleNamespace

import pytest
import torch

from ds_vicuna.train.packed_attention import PACKED_SDPA, packed_sdpa_attention, register_packed_sdpa, segment_starts
from tests.support.gpu_device import DEVICE


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
