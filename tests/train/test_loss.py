"""ds_vicuna.train.loss: the chunked lm_head + cross-entropy equals the plain full-logits path (loss and every
gradient), `shift_labels` is used as given, and a model that transforms its logits is refused."""
import pytest
import torch

from tests.support.device_checks import chunked_loss_matches_plain, packed_batch, tiny_llama
from ds_vicuna.chat.encoding import IGNORE_INDEX
from ds_vicuna.train.linear_cross_entropy import linear_cross_entropy_sum
from ds_vicuna.train.loss import LossHeadError, count_label_tokens, shifted_labels, token_loss_sum


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)], ids=["fp32", "bf16"])
def test_chunked_loss_and_gradients_equal_the_plain_path(tied, dtype, tol):
    # bf16: the chunked path sums lm_head's weight gradient over chunks in fp32 (the plain path in one bf16 GEMM)
    chunked_loss_matches_plain("cpu", dtype, tied=tied, tol=tol)


def test_shift_labels_are_used_as_given():
    model, batch = tiny_llama("cpu", torch.float32), packed_batch("cpu")
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits  # [B, T, V]
        given = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"],
                 "shift_labels": shifted_labels(batch)}
        assert count_label_tokens(given) == count_label_tokens(batch) == int((batch["labels"][:, 1:] != -100).sum())
        for chunk in (None, 5):
            assert torch.allclose(token_loss_sum(model, given, chunk), token_loss_sum(model, batch, chunk))
        # a shard's labels are not shifted again: position t is scored against shift_labels[t] itself
        unshifted = dict(given, shift_labels=batch["labels"])
        expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum")
        for chunk in (None, 5):
            assert torch.allclose(token_loss_sum(model, unshifted, chunk), expected, rtol=1e-5)


def test_no_label_and_no_grad():
    hidden = torch.randn(2, 3, 8, requires_grad=True)
    weight = torch.randn(16, 8, requires_grad=True)
    none = torch.full((2, 3), IGNORE_INDEX)
    loss = linear_cross_entropy_sum(hidden, weight, None, none, 2)
    loss.backward()  # a micro-batch without a labelled token still backpropagates (zeros)
    assert loss.item() == 0 and hidden.grad.abs().sum() == 0 and weight.grad.abs().sum() == 0
    labels = torch.tensor([[1, IGNORE_INDEX, 3], [4, 5, IGNORE_INDEX]])
    bias = torch.randn(16, requires_grad=True)
    with torch.no_grad():
        lean = linear_cross_entropy_sum(hidden, weight, bias, labels, 3)
    plain = torch.nn.functional.cross_entropy((hidden @ weight.T + bias).flatten(0, 1), labels.flatten(),
                                              reduction="sum")
    assert torch.allclose(lean, plain, rtol=1e-5)
    hidden.grad, weight.grad = None, None
    plain.backward()
    expected = (hidden.grad.clone(), weight.grad.clone(), bias.grad.clone())
    hidden.grad, weight.grad, bias.grad = None, None, None
    (linear_cross_entropy_sum(hidden, weight, bias, labels, 2) * 1.0).backward()
    for got, want in zip((hidden.grad, weight.grad, bias.grad), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_model_that_transforms_its_logits_is_refused():
    model, batch = tiny_llama("cpu", torch.float32), packed_batch("cpu")
    forward = type(model).forward

    def softcapped(self, *args, **kwargs):  # what Gemma 2 does after lm_head
        out = forward(self, *args, **kwargs)
        out.logits = 30.0 * torch.tanh(out.logits / 30.0)
        return out

    model.forward = softcapped.__get__(model)
    with pytest.raises(LossHeadError, match="loss_chunk_tokens to null"):
        token_loss_sum(model, batch, 4)
    assert "forward" not in model.get_output_embeddings().__dict__
    token_loss_sum(model, batch, None)  # the plain path still works


def test_label_positions_from_the_host_spare_the_step_a_sync(monkeypatch):
    """add_label_index (run where collate runs, on the host) gives the chunked loss its labelled positions and the
    trainer its count: the step itself then calls no `nonzero` and reads no count back (host syncs on a GPU)."""
    from ds_vicuna.train.loss import add_label_index

    model, batch = tiny_llama("cpu", torch.float32), packed_batch("cpu")
    expected = token_loss_sum(model, batch, 4)  # also passes the once-per-model output-layer check
    indexed = add_label_index(dict(batch))
    assert indexed["num_label_tokens"] == int((batch["labels"][:, 1:] != -100).sum())
    assert indexed["label_rows"].tolist() == torch.nonzero(shifted_labels(batch).flatten() != -100).flatten().tolist()

    def no_sync(*args, **kwargs):
        raise AssertionError("nonzero inside the step: a host sync on a GPU")

    monkeypatch.setattr(torch.Tensor, "nonzero", no_sync)
    monkeypatch.setattr(torch, "nonzero", no_sync)
    assert count_label_tokens(indexed) == indexed["num_label_tokens"]
    loss = token_loss_sum(model, indexed, 4)
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)


@pytest.mark.gpu
def test_the_loss_step_makes_no_host_sync_gpu():
    """The chunked loss and the backward through it and the model, with the host's label index, under CUDA's sync
    debug mode "error": a `nonzero`, `.item()` or count read back inside raises. (The model's once-per-model
    output-layer check and the forward to the hidden states, where transformers builds its mask, run outside.)"""
    from ds_vicuna.train.loss import add_label_index
    from tests.support.gpu_device import DEVICE

    if DEVICE != "cuda":
        pytest.skip("not on this machine: needs CUDA (torch.cuda.set_sync_debug_mode; CPU rehearsal)")
    model, batch = tiny_llama("cuda", torch.bfloat16), packed_batch("cpu")
    indexed = {k: v.to("cuda") if torch.is_tensor(v) else v for k, v in add_label_index(dict(batch)).items()}
    token_loss_sum(model, indexed, 4)  # the once-per-model check syncs: outside the debug mode
    hidden = model.model(input_ids=indexed["input_ids"], position_ids=indexed["position_ids"]).last_hidden_state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = linear_cross_entropy_sum(hidden, model.lm_head.weight, None, shifted_labels(indexed), 4,
                                        indexed["label_rows"])
        loss.backward()
        assert count_label_tokens(indexed) > 0
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()
