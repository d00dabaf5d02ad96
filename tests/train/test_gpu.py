"""Training on one CUDA GPU, proven (`make gpu-check` runs the `gpu` tests; elsewhere they skip with the reason).

- bf16 ZeRO-3, and ZeRO-3 + CPU offload (DeepSpeedCPUAdam), through the real trainer: loss finite and decreasing
  on a repeated batch, MFU logged; exact resume (relative loss difference <= 1e-3: bf16 kernels may reduce in a
  different order between runs); export loads in plain transformers on the GPU and equals the engine's
  parameters bit for bit (bf16) and the fp32 master copy (--dtype fp32).
- packed rows give each conversation's own per-token losses with SDPA, flex_attention and flash_attention_2
  (the last two where installed); relative norm error <= 1e-5 in fp32, <= 5e-3 in bf16 (10x what CPU bf16 shows),
  and without isolation 5x that.
- the chunked loss equals the plain full-logits loss, gradients included (bf16 <= 2e-2, fp32 <= 1e-4).
- gradient checkpointing on/off and chunked/plain loss give the same ZeRO-3 gradients (bf16 <= 2e-2).

The bodies are in device_checks.py; the `slow` CPU twins at the bottom run the trainer ones on CPU (fp32,
tolerance 1e-6) and tests/train/test_loss.py the loss ones, so every line here has run before a GPU sees it;
`make gpu-rehearsal` runs the `gpu` tests themselves on the CPU (tests/support/gpu_device.py).
"""
import importlib.util
import sys

import pytest
import torch

from tests.support.device_checks import (check_export, check_repeated_batch_run, check_resume,
                                         chunked_loss_matches_plain, packed_rows_match_alone, relative_error,
                                         repeated_batch_config, train_run)
from tests.support.gpu_device import DEVICE, hardware_skip_reason, needs_cuda
from tests.support.tiny_llama import REPO, make_tiny_model, run_checked, write_conversations, write_train_config

gpu = pytest.mark.gpu
RESUME_REL = {"cuda": 1e-3, "cpu": 1e-6}


def attention_cases() -> list:
    """(attention, dtype, tolerance): sdpa in bf16 and fp32; flex_attention (when this transformers has it) and
    flash_attention_2 (when flash-attn is installed; CUDA only) in bf16, the training precision (flash is 16-bit
    only; flex compiles each shape: the time budget)."""
    from transformers.utils import is_torch_flex_attn_available

    bf16, fp32 = (torch.bfloat16, 5e-3), (torch.float32, 1e-5)
    no_flex = pytest.mark.skipif(not is_torch_flex_attn_available(),
                                 reason=hardware_skip_reason("flex_attention (this torch lacks it)"))
    no_flash = pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None,
                                  reason=hardware_skip_reason("flash-attn (not installed)"))
    return [pytest.param("sdpa", *bf16, id="sdpa-bf16"), pytest.param("sdpa", *fp32, id="sdpa-fp32"),
            pytest.param("flex_attention", *bf16, id="flex_attention-bf16", marks=no_flex),
            pytest.param("flash_attention_2", *bf16, id="flash_attention_2-bf16",
                         marks=[needs_cuda("flash-attn"), no_flash])]


@gpu
@pytest.mark.parametrize("attn, dtype, tol", attention_cases())
def test_packed_rows_match_conversations_alone_gpu(attn, dtype, tol):
    packed_rows_match_alone(DEVICE, dtype, attn, tol)


@gpu
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 2e-2), (torch.float32, 1e-4)], ids=["bf16", "fp32"])
def test_chunked_loss_equals_plain_gpu(tied, dtype, tol):
    chunked_loss_matches_plain(DEVICE, dtype, tied=tied, tol=tol)


@gpu
def test_gradient_checkpointing_and_chunked_loss_keep_zero3_gradients_gpu(tmp_path):
    model = make_tiny_model(tmp_path / "model")
    data = write_conversations(tmp_path / "train.jsonl", n=8, seed=1)
    cfg = write_train_config(tmp_path / "cfg.yaml", model, data, deepspeed="zero3", data_opts={"batching": "group"},
                             output_dir=tmp_path / "out", learning_rate=1.0e-3, warmup_ratio=0.0, epochs=1)
    variants = ("4x1", "4x1:gradient_checkpointing=false", "4x1:loss_chunk_tokens=null")
    run_checked([sys.executable, REPO / "tests/support/scripts/grad_check.py", cfg, tmp_path / "grads.pt", *variants],
                timeout=600, gpu=True)
    results = torch.load(tmp_path / "grads.pt")
    reference = results[variants[0]]
    for variant in variants[1:]:
        other = results[variant]
        assert other["tokens"] == reference["tokens"] > 0
        assert other["loss"] == pytest.approx(reference["loss"], rel=2e-2), variant
        for name, grad in reference["grads"].items():
            assert grad.abs().sum() > 0, name
            assert relative_error(other["grads"][name], grad) <= 2e-2, (variant, name)


# ------------------------------------------------------------------ the trainer on a repeated batch, resume, export


@pytest.fixture(scope="module", params=["zero3", "zero3_offload"])
def gpu_run(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"gpu_{request.param}")
    config = repeated_batch_config(tmp, request.param, "bf16")
    return tmp, config, request.param, train_run(tmp, config, "first", True)


@gpu
def test_bf16_zero3_loss_decreases_on_a_repeated_batch_gpu(gpu_run):
    from ds_vicuna.train.metrics import peak_flops

    _, _, deepspeed, run = gpu_run
    peak = peak_flops("bf16") if DEVICE == "cuda" else None
    check_repeated_batch_run(run, "bf16", offload=deepspeed == "zero3_offload", peak=peak)


@gpu
def test_resume_reproduces_the_losses_gpu(gpu_run):
    tmp, config, _, run = gpu_run
    check_resume(tmp, config, run, "first", gpu=True, rel=RESUME_REL["cuda"])  # bf16 either way


@gpu
def test_export_loads_in_transformers_and_equals_the_engine_gpu(gpu_run, tmp_path):
    check_export(gpu_run[3], tmp_path, DEVICE)


# -------------------------------------------------------------- CPU twins: the same bodies, fp32, one process


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cpu_twin")
    config = repeated_batch_config(tmp, "zero3", "fp32")
    return tmp, config, train_run(tmp, config, "first", False)


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 5e-3), (torch.float32, 1e-5)], ids=["bf16", "fp32"])
def test_packed_rows_match_conversations_alone_cpu(dtype, tol):
    packed_rows_match_alone("cpu", dtype, "sdpa", tol)


@pytest.mark.slow
def test_repeated_batch_resume_and_export_cpu(cpu_run, tmp_path):
    tmp, config, run = cpu_run
    check_repeated_batch_run(run, "fp32", offload=False, peak=None)
    check_resume(tmp, config, run, "first", gpu=False, rel=RESUME_REL["cpu"])
    check_export(run, tmp_path, "cpu")


# ------------------------------------------------------------------------------------------------- QLoRA (4-bit)


needs_bitsandbytes = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                                        reason="QLoRA needs bitsandbytes: pip install 'ds-vicuna[qlora]' (make env "
                                        "and `make gpu-wheels` bring it)")


def check_qlora(tmp_path, gpu: bool) -> None:
    """model.quantization (nf4, double quant, bf16 storage) under ZeRO-3 on one device: the base's linear layers are
    bitsandbytes' Linear4bit, only the adapters train, the loss falls, and the export is a peft adapter."""
    import json

    model = make_tiny_model(tmp_path / "model", hidden=128)
    data = write_conversations(tmp_path / "train.jsonl", n=16, seed=1)
    cfg = write_train_config(tmp_path / "cfg.yaml", model, data, deepspeed="zero3", data_opts={"batching": "pack"},
                             learning_rate=5e-3, global_batch_size=2, micro_batch_size=1, max_steps=6,
                             save_every=6, precision="bf16")
    qlora = "model:\n  lora: {r: 8, alpha: 16}\n  quantization: {bits: 4, type: nf4, compute_dtype: bf16}\n"
    cfg.write_text(cfg.read_text().replace("model:\n", qlora, 1))
    dump = tmp_path / "q.pt"
    proc = run_checked([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1",
                        REPO / "tests/support/scripts/train_and_dump.py", dump, cfg, "--output_dir", tmp_path / "Q"],
                       timeout=600, gpu=gpu)
    assert "trainable of" in proc.stdout
    result = torch.load(dump)
    assert "Linear4bit" in result["module_types"], result["module_types"]
    assert result["trainable"] and all(".lora_" in n for n in result["trainable"])
    losses = [result["losses"][s] for s in sorted(result["losses"])]
    assert losses[-1] < losses[0]
    from ds_vicuna.cli import main as cli_main

    assert cli_main(["export", str(tmp_path / "Q"), str(tmp_path / "adapter")]) == 0
    assert json.loads((tmp_path / "adapter/adapter_config.json").read_text())["r"] == 8


@gpu
@needs_bitsandbytes
def test_qlora_trains_adapters_on_a_4bit_base_under_zero3_gpu(tmp_path):
    check_qlora(tmp_path, gpu=True)


@pytest.mark.slow
@needs_bitsandbytes
def test_qlora_trains_adapters_on_a_4bit_base_under_zero3_cpu(tmp_path):
    """bitsandbytes >= 0.46 has 4-bit kernels for the CPU: the same run on this machine."""
    check_qlora(tmp_path, gpu=False)
