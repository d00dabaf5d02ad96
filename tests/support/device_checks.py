"""Checks that run on any device: CPU tests call them with ("cpu", float32), the `gpu`-marked tests in
tests/train/test_gpu.py with ("cuda", bfloat16) and the tolerance that dtype allows, so a GPU run can only fail
for a GPU reason.

    from tests.support.device_checks import chunked_loss_matches_plain, packed_rows_match_alone
    chunked_loss_matches_plain("cuda", torch.bfloat16, tied=True, tol=2e-2)
    run = train_run(tmp, repeated_batch_config(tmp, "zero3", "bf16"), "a", gpu=True)   # the real trainer, one process
"""
from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import torch

from ds_vicuna.train.batching import IGNORE_INDEX, collate, configure_model_for_packing
from ds_vicuna.train.loss import token_loss_sum
from tests.support.tiny_llama import REPO, make_tiny_model, run_checked, write_conversations, write_train_config

VOCAB = 512
LENGTHS = (7, 5, 9)


def tiny_llama(device: str, dtype: torch.dtype, attn: str = "sdpa", tied: bool = False, seed: int = 0,
               init_range: float = 0.02):
    """A random 2-layer Llama (hidden 64, vocab 512) on `device` in `dtype`, KV cache off (packing-ready)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=tied, attn_implementation=attn, initializer_range=init_range)
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


def per_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[T-1]: loss of logits[0, t] predicting labels[0, t + 1] (0 where the label is ignored), fp32."""
    return torch.nn.functional.cross_entropy(logits[0, :-1].float(), labels[0, 1:], reduction="none",
                                             ignore_index=IGNORE_INDEX)


def packed_rows_match_alone(device: str, dtype: torch.dtype, attn: str, tol: float) -> float:
    """Per-token losses of three conversations packed in one row (and, for flash attention, flattened) equal
    those of each conversation run alone, within `tol` (relative norm error, returned); without isolation
    (plain causal attention over the row) the later conversations' losses must differ 5x more than that.
    Weights drawn with std 0.1 (not 0.02) so attention is sharp enough for the leak to show (~8% in fp32)."""
    model, convs = tiny_llama(device, dtype, attn=attn, init_range=0.1), conversations()
    flatten = attn.startswith("flash_attention")
    batch = collate([convs], "pack", sum(LENGTHS) + 3, pad_token_id=0, flatten=flatten)  # 3 padding tokens
    batch = {k: v.to(device) for k, v in batch.items() if k != "num_label_tokens"}
    real = sum(LENGTHS)
    alone = []
    with torch.no_grad():
        for conv in convs:
            ids = torch.tensor([conv["input_ids"]], device=device)
            # the packed row's view: [position of the first token] + losses predicting tokens 1..n-1
            alone += [torch.zeros(1, device=device),
                      per_token_losses(model(input_ids=ids).logits, torch.tensor([conv["labels"]], device=device))]
        expected = torch.cat(alone)[1:]  # [real - 1]: the row's first token is never predicted
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        error = relative_error(per_token_losses(logits, batch["labels"])[:real - 1], expected)
        causal = model(input_ids=batch["input_ids"]).logits  # no isolation: later conversations see earlier ones
        later = slice(LENGTHS[0], real - 1)  # the first conversation sees nothing else either way
        leak = relative_error(per_token_losses(causal, batch["labels"])[later], expected[later])
    assert expected.sum() > 0 and error <= tol, (attn, dtype, error)
    assert leak > 5 * max(error, tol), (attn, dtype, leak, error)
    return error


# ------------------------------------------------------------------------------- the real trainer, one process
REPEATED_STEPS = 6


def repeated_batch_config(tmp: Path, deepspeed: str, precision: str) -> Path:
    """Four short conversations (~600 tokens) packed into one 1024-token row = the whole global batch: every step
    trains on the same batch (re-shuffled inside the row each epoch), 6 epochs of 1 step, a checkpoint every 2.
    The model has 1024 positions, so the row's length passes the trainer's max_length check."""
    model = make_tiny_model(tmp / "model", max_positions=1024)
    data = write_conversations(tmp / "train.jsonl", n=4, seed=5, max_words=12)
    return write_train_config(tmp / f"{deepspeed}.yaml", model, data, deepspeed=deepspeed,
                              data_opts={"batching": "pack", "max_length": 1024}, precision=precision,
                              learning_rate=3.0e-3, warmup_ratio=0.0,
                              lr_scheduler="constant", epochs=REPEATED_STEPS, global_batch_size=1,
                              micro_batch_size=1, save_every=2, keep_last=5)


def train_run(tmp: Path, config: Path, name: str, gpu: bool, *overrides: str) -> dict:
    """`tests/support/scripts/train_and_dump.py` in one process (no launcher) into tmp/name; its dump plus stdout, the
    metrics records and the training record written beside the final checkpoint."""
    dump = tmp / f"{name}.pt"
    proc = run_checked([sys.executable, REPO / "tests/support/scripts/train_and_dump.py", dump, config,
                        "--output_dir", tmp / name, *overrides], timeout=900, gpu=gpu)
    result = torch.load(dump)
    result["stdout"] = proc.stdout
    result["metrics"] = [json.loads(line) for line in (tmp / name / "metrics.jsonl").read_text().splitlines()]
    result["record"] = json.loads((Path(result["checkpoint"]) / "hf/ds_vicuna_train_config.json").read_text())
    return result


def check_repeated_batch_run(run: dict, precision: str, offload: bool, peak: float | None) -> list[float]:
    """Loss finite and decreasing on the repeated batch; the precision and optimizer placement asked for;
    tokens/s logged every step and MFU too when the GPU's peak is known (`peak`). Returns the losses."""
    losses = [run["losses"][step] for step in sorted(run["losses"])]
    assert sorted(run["losses"]) == list(range(1, REPEATED_STEPS + 1)) and run["exit_code"] == 0
    assert all(math.isfinite(loss) for loss in losses), losses
    assert losses[-1] < 0.8 * losses[0] and min(losses[3:]) < min(losses[:3]), losses
    assert run["record"]["precision"] == precision
    assert ("offload optimizer: cpu" in run["stdout"]) is offload
    assert ("DeepSpeedCPUAdam" in run["stdout"]) is offload
    assert all(math.isfinite(float(p.sum())) for p in run["params"].values())
    records = [r for r in run["metrics"] if "loss" in r]
    assert len(records) == REPEATED_STEPS and all(r["tokens_per_s"] > 0 for r in records)
    if peak:
        assert all(0 < r["mfu"] < 1 for r in records), records
    else:
        assert not any("mfu" in r for r in records)
    return losses


def check_resume(tmp: Path, config: Path, first: dict, name: str, gpu: bool, rel: float) -> float:
    """A run resumed from `first`'s step-2 checkpoint reproduces its losses for steps 3.. within `rel`
    (relative); returns the largest relative difference."""
    folder = tmp / f"{name}-resumed"
    folder.mkdir()
    shutil.copytree(Path(first["checkpoint"]).parent / "step-000002", folder / "step-000002")
    (folder / "latest").write_text("step-000002")
    resumed = train_run(tmp, config, folder.name, gpu, "--resume", "auto")
    assert sorted(resumed["losses"]) == list(range(3, REPEATED_STEPS + 1))
    worst = max(abs(loss - first["losses"][step]) / first["losses"][step] for step, loss in resumed["losses"].items())
    assert worst <= rel, (worst, resumed["losses"], first["losses"])
    return worst


def check_export(run: dict, out: Path, device: str) -> None:
    """`ds-vicuna export` of the run's last checkpoint loads in plain transformers on `device` and holds the
    engine's parameters exactly: in the training precision (auto) and as the fp32 master copy (--dtype fp32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ds_vicuna.cli import main as cli_main
    from ds_vicuna.chat.encoding import encode_prompt

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[run["record"]["precision"]]
    for kind, expected, flags in (("auto", run["params"], []), ("fp32", run["master"], ["--dtype", "fp32"])):
        assert cli_main(["export", run["checkpoint"], str(out / kind), *flags]) == 0
        model = AutoModelForCausalLM.from_pretrained(out / kind, dtype="auto").to(device)
        assert model.dtype == (dtype if kind == "auto" else torch.float32), (kind, model.dtype)
        exported = dict(model.named_parameters())
        assert exported.keys() == expected.keys()
        for name, value in expected.items():
            torch.testing.assert_close(exported[name].detach().float().cpu(), value.float(), rtol=0, atol=0,
                                       msg=f"{kind}: {name}")
    tokenizer = AutoTokenizer.from_pretrained(out / "auto")
    prompt = encode_prompt([{"role": "user", "content": "apple river"}], tokenizer, "vicuna_v1.1")
    with torch.no_grad():
        generated = model.generate(torch.tensor([prompt], device=device), max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > len(prompt) and generated.device.type == device
