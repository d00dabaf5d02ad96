"""LoRA training on CPU with the real `deepspeed` launcher: 2 ranks, ZeRO-3 + CPU offload (DeepSpeedCPUAdam),
packing, gradient checkpointing and the chunked loss (the defaults), a tiny Llama with attention dropout.

Run A trains 6 steps over 2 epochs saving every 2; the base weights must come out bitwise equal, only the
adapters train, the loss falls and each checkpoint holds the adapters and their optimizer state only. A resume
from A's step 2 at the same world size and on 1 rank must reproduce A's later losses; the export must load in
plain peft (`PeftModel.from_pretrained`) with A's logits, and `--merge` must equal base + adapter. A ZeRO-2 run
with the chatml template (which adds tokens to the vocabulary) must train the new embedding rows."""
import json
import subprocess

import pytest
import torch

from tests.support.tiny_llama import (ELASTIC_LOSS_RTOL, ELASTIC_WEIGHT_ATOL, REPO, copy_checkpoint,
                                      deepspeed_command, make_tiny_model, run_checked, subprocess_env,
                                      write_conversations, write_resume_run, write_train_config)

pytestmark = pytest.mark.slow
DUMP = REPO / "tests/support/scripts/train_and_dump.py"
LORA = {"r": 4, "alpha": 8.0}


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora")
    cfg = write_resume_run(tmp)
    cfg.write_text(cfg.read_text().replace("model:\n", f"model:\n  lora: {json.dumps(LORA)}\n", 1))
    proc = run_checked(deepspeed_command(2, DUMP, tmp / "a.pt", cfg, "--output_dir", tmp / "A"), timeout=900)
    return tmp, cfg, torch.load(tmp / "a.pt"), proc.stdout + proc.stderr


def run_ranks(ranks: int, dump, cfg, *args, timeout: int = 900) -> str:
    proc = subprocess.run(deepspeed_command(ranks, DUMP, dump, cfg, *args), capture_output=True, text=True,
                          timeout=timeout, env=subprocess_env())
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


def base_weights(model_dir) -> dict:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def test_only_adapters_train_and_the_base_stays_bitwise(run_a):
    tmp, _, a, log = run_a
    trainable = set(a["trainable"])
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    targets = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # all-linear
    base = base_weights(tmp / "model")
    frozen = {n: v for n, v in a["params"].items() if n not in trainable}
    assert {n.replace(".base_layer", "") for n in frozen} == set(base)
    for name, value in frozen.items():
        assert torch.equal(value, base[name.replace(".base_layer", "")]), name
    assert any(a["params"][n].abs().max() > 0 for n in trainable if ".lora_B." in n)  # B starts at zero: it moved
    losses = [a["losses"][s] for s in sorted(a["losses"])]
    assert losses[-1] < losses[0]
    trained = sum(a["params"][n].numel() for n in trainable)
    total = sum(v.numel() for v in a["params"].values())
    assert f"{trained / 1e6:.2f}M trainable of {total / 1e6:.1f}M parameters" in log


def test_checkpoint_holds_the_adapters_and_their_optimizer_state_only(run_a):
    tmp, _, a, _ = run_a
    folder = tmp / "A" / f"step-{a['step']:06d}"
    for rank in (0, 1):
        states = torch.load(folder / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt", weights_only=False)
        assert sorted(states["module"]) == sorted(a["trainable"])
        assert states["frozen_param_fragments"] is None
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    base_bytes = sum(v.numel() * 4 for v in base_weights(tmp / "model").values())
    adapter_bytes = sum(a["params"][n].numel() * 4 for n in a["trainable"])
    # fp32 adapters + 2 Adam moments, plus a few KB of bookkeeping per file; the base (weights + Adam: 3x) is absent
    assert size < 3 * adapter_bytes + 200_000 < 3 * base_bytes
    print(f"LoRA checkpoint {size / 1e3:.0f} kB; the full fine-tuning weights + Adam would be "
          f"{3 * base_bytes / 1e3:.0f} kB")


def test_resume_reproduces_every_later_loss(run_a):
    tmp, cfg, a, _ = run_a
    out = copy_checkpoint(tmp / "A", "step-000002", tmp / "B")
    run_ranks(2, tmp / "b.pt", cfg, "--output_dir", out, "--resume", "auto")
    b = torch.load(tmp / "b.pt")
    assert sorted(b["losses"]) == list(range(3, a["step"] + 1))
    for step in b["losses"]:
        assert b["losses"][step] == pytest.approx(a["losses"][step], rel=1e-6, abs=1e-7), step
    for name, value in a["params"].items():
        torch.testing.assert_close(b["params"][name], value, rtol=0, atol=1e-6, msg=name)


def test_two_rank_checkpoint_resumes_on_one_rank(run_a):
    tmp, cfg, a, _ = run_a
    out = copy_checkpoint(tmp / "A", "step-000002", tmp / "shrink")
    log = run_ranks(1, tmp / "shrink.pt", cfg, "--output_dir", out, "--resume", "auto")
    assert "was written by 2 rank(s), this run has 1: converting it once" in log
    got = torch.load(tmp / "shrink.pt")
    for step in range(3, a["step"] + 1):
        assert got["losses"][step] == pytest.approx(a["losses"][step], rel=ELASTIC_LOSS_RTOL, abs=1e-7), step
    for name, value in a["params"].items():
        torch.testing.assert_close(got["params"][name], value, rtol=0, atol=ELASTIC_WEIGHT_ATOL, msg=name)


def _trained_model(tmp, a):
    """The model run A trained, rebuilt in plain transformers + peft from A's dumped parameters."""
    import peft
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp / "model", dtype=torch.float32)
    peft.inject_adapter_in_model(peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules="all-linear"),
                                 model)
    model.load_state_dict(a["params"], strict=True)
    return model.eval()


def test_export_is_a_peft_adapter_and_merge_equals_base_plus_adapter(run_a):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ds_vicuna.cli import main as cli_main

    tmp, _, a, _ = run_a
    assert cli_main(["export", str(tmp / "A"), str(tmp / "adapter")]) == 0
    assert cli_main(["export", "--merge", str(tmp / "A"), str(tmp / "merged")]) == 0
    files = {p.name for p in (tmp / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "ds_vicuna.json",
            "tokenizer_config.json"} <= files and not any(f.startswith("model") for f in files)
    assert str(tmp / "model") in (tmp / "adapter/README.md").read_text()
    card = json.loads((tmp / "adapter/ds_vicuna.json").read_text())
    assert card["base_model"] == str(tmp / "model") and card["adapter"] is True
    AutoTokenizer.from_pretrained(tmp / "adapter")
    ids = torch.randint(3, 400, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = _trained_model(tmp, a)(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tmp / "model", dtype=torch.float32)
        loaded = PeftModel.from_pretrained(base, tmp / "adapter").eval()
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=1e-6)
        with loaded.disable_adapter():
            assert (loaded(input_ids=ids).logits - expected).abs().max() > 1e-3  # the adapter matters
        merged = AutoModelForCausalLM.from_pretrained(tmp / "merged").eval()
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=0, atol=1e-4)
    assert not any(".lora_" in name for name, _ in merged.named_parameters())


def test_added_template_tokens_train_their_rows_under_zero2(tmp_path):
    """chatml adds <|im_start|>/<|im_end|> to the tiny tokenizer: embed_tokens and lm_head train whole (said in the
    log), under ZeRO-2 on one rank; the export carries them and loads in peft on the resized base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ds_vicuna.cli import main as cli_main

    model = make_tiny_model(tmp_path / "model")
    data = write_conversations(tmp_path / "train.jsonl", n=16, seed=1)
    cfg = write_train_config(tmp_path / "cfg.yaml", model, data, deepspeed="zero2", data_opts={"batching": "pack"},
                             learning_rate=1e-2, global_batch_size=2, micro_batch_size=1, max_steps=2, save_every=2)
    cfg.write_text(cfg.read_text().replace("model:\n", f"model:\n  lora: {json.dumps(LORA)}\n  template: chatml\n", 1))
    proc = run_checked(deepspeed_command(1, DUMP, tmp_path / "z.pt", cfg, "--output_dir", tmp_path / "Z"), timeout=600)
    assert "embed_tokens and lm_head train whole (added to model.lora.modules_to_save)" in proc.stdout
    z = torch.load(tmp_path / "z.pt")
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(z["trainable"])
    base = base_weights(model)
    grown = z["params"]["model.embed_tokens.weight"]
    rows = base["model.embed_tokens.weight"].shape[0]
    assert grown.shape[0] > rows and not torch.equal(grown[:rows], base["model.embed_tokens.weight"])
    assert cli_main(["export", str(tmp_path / "Z"), str(tmp_path / "adapter")]) == 0
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "adapter")
    assert "<|im_end|>" in tokenizer.get_vocab()
    config = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    assert sorted(config["modules_to_save"]) == ["embed_tokens", "lm_head"]
    plain = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    plain.resize_token_embeddings(json.loads((tmp_path / "adapter/ds_vicuna.json").read_text())["adapter_vocab_size"])
    loaded = PeftModel.from_pretrained(plain, tmp_path / "adapter").eval()
    torch.testing.assert_close(loaded.get_input_embeddings().weight, grown)
