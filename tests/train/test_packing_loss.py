"""A packed row trains exactly like its conversations run one at a time (tiny random Llama on CPU)."""
import pytest
import torch

from ds_vicuna.train.batching import IGNORE_INDEX, collate, configure_model_for_packing
from ds_vicuna.train.packed_attention import PACKED_SDPA, register_packed_sdpa

pytestmark = pytest.mark.slow
LENGTHS = (7, 5, 9)
MAX_LENGTH = 24  # 21 real tokens + 3 padding


def tiny_llama(attn_implementation):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         attn_implementation=attn_implementation)
    return LlamaForCausalLM(config).eval()


def conversations():
    gen = torch.Generator().manual_seed(1)
    out = []
    for k, n in enumerate(LENGTHS):
        ids = torch.randint(1, 96, (n,), generator=gen).tolist()
        # a masked prompt like a real sample; the middle one is trained on every token (mask "all")
        labels = ids if k == 1 else [IGNORE_INDEX, IGNORE_INDEX] + ids[2:]
        out.append({"input_ids": ids, "labels": labels})
    return out


def token_losses(logits, labels):
    """Per-token loss of logits[t] predicting labels[t + 1] (the model's own shift), -100 kept as 0."""
    return torch.nn.functional.cross_entropy(logits[0, :-1].float(), labels[0, 1:], reduction="none",
                                             ignore_index=IGNORE_INDEX)  # [T-1]


def alone_losses(model, convs):
    """Per-token losses of each conversation run by itself, concatenated as in the packed row."""
    pieces = []
    with torch.no_grad():
        for conv in convs:
            ids, labels = torch.tensor([conv["input_ids"]]), torch.tensor([conv["labels"]])
            # the packed row's view: [position of the first token] + losses predicting tokens 1..n-1
            pieces += [torch.zeros(1), token_losses(model(input_ids=ids).logits, labels)]
    return torch.cat(pieces)[1:]  # [21 - 1]: the row's first token is never predicted


def packed(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits


@pytest.mark.parametrize("attn", ["sdpa", "eager", PACKED_SDPA])
def test_packed_row_matches_conversations_alone(attn):
    register_packed_sdpa()
    model, convs = tiny_llama(attn), conversations()
    assert configure_model_for_packing(model) is False
    batch = collate([convs], "pack", MAX_LENGTH, pad_token_id=0)
    real = sum(LENGTHS)
    row_losses = token_losses(packed(model, batch), batch["labels"])[:real - 1]
    expected = alone_losses(model, convs)
    assert torch.allclose(row_losses, expected, atol=1e-5)
    # the model's own loss over the packed row (it shifts labels itself) equals the mean over the conversations
    assert batch["num_label_tokens"] == (7 - 2) + (5 - 1) + (9 - 2)  # what each predicts when run alone
    with torch.no_grad():
        loss = model(**{k: v for k, v in batch.items() if k != "num_label_tokens"}).loss
    assert torch.allclose(loss, expected.sum() / batch["num_label_tokens"], atol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_without_isolation_losses_differ(attn):
    model, convs = tiny_llama(attn), conversations()
    batch = collate([convs], "pack", MAX_LENGTH, pad_token_id=0)
    real = sum(LENGTHS)
    expected = alone_losses(model, convs)
    with torch.no_grad():
        causal = model(input_ids=batch["input_ids"]).logits  # plain causal attention over the whole row
    assert not torch.allclose(token_losses(causal, batch["labels"])[:real - 1], expected, atol=1e-3)
    # the trap configure_model_for_packing closes: with the KV cache on (the config default) transformers
    # skips packed-sequence detection, so position_ids alone do not isolate the conversations
    assert model.config.use_cache
    leaky = packed(model, batch)
    assert not torch.allclose(token_losses(leaky, batch["labels"])[:real - 1], expected, atol=1e-3)


def test_flattened_rows_isolate_with_sdpa_and_give_flash_its_boundaries():
    """`flatten=True` (one row, no padding) is what flash_attention_2's varlen path needs; check both halves."""
    from transformers.modeling_flash_attention_utils import (_is_packed_sequence,
                                                             prepare_fa_kwargs_from_position_ids)

    model, convs = tiny_llama("sdpa"), conversations()
    configure_model_for_packing(model)
    rows = [convs[:2], convs[2:]]
    flat = collate(rows, "pack", 16, pad_token_id=0, flatten=True)
    assert flat["input_ids"].shape == (1, sum(LENGTHS))
    assert torch.allclose(token_losses(packed(model, flat), flat["labels"]), alone_losses(model, convs), atol=1e-5)
    # flash attention reads sequence boundaries from position_ids only when the batch is a single row
    assert _is_packed_sequence(flat["position_ids"], batch_size=1)
    (cu_seqlens, _), (max_len, _) = prepare_fa_kwargs_from_position_ids(flat["position_ids"])
    assert cu_seqlens.tolist() == [0, 7, 12, 21] and max_len == 9
    padded = collate(rows, "pack", 16, pad_token_id=0)
    assert not _is_packed_sequence(padded["position_ids"], batch_size=2)  # why flatten exists


def test_configure_model_for_packing_rejects_unknown_attention():
    model = tiny_llama("sdpa")
    model.config._attn_implementation = "paged|custom"
    with pytest.raises(ValueError, match="cannot isolate packed conversations"):
        configure_model_for_packing(model)
