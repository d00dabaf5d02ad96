"""Exact resume and consolidated export on CPU: 2 ranks, ZeRO-3 + CPU offload (DeepSpeedCPUAdam), the real
`deepspeed` launcher, a tiny Llama. Run A trains ~6 steps over 2 epochs saving every 2; run B starts from A's
step-2 checkpoint (next to a half-written step-4 folder that must be ignored) and must reproduce A's losses."""
import json
import shutil

import pytest
import torch

from tiny_llama import REPO, deepspeed_command, make_tiny_model, run_checked, write_conversations, write_train_config

pytestmark = pytest.mark.slow
DUMP = REPO / "tests/scripts/train_and_dump.py"


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    model = make_tiny_model(tmp / "model")
    data = write_conversations(tmp / "train.jsonl", n=36, seed=3)
    cfg = write_train_config(tmp / "cfg.yaml", model, data, data_opts={"batching": "pack"}, learning_rate=3.0e-3,
                             warmup_ratio=0.2, epochs=2, global_batch_size=4, micro_batch_size=1, save_every=2,
                             keep_last=5)
    run_checked(deepspeed_command(2, DUMP, tmp / "a.pt", cfg, "--output_dir", tmp / "A"), timeout=400)
    return tmp, cfg, torch.load(tmp / "a.pt")


def test_checkpoint_folder_layout(run_a):
    tmp, _, a = run_a
    out = tmp / "A"
    total = a["step"]
    assert total >= 5 and (out / "latest").read_text() == f"step-{total:06d}"
    folder = out / f"step-{total:06d}"
    names = {p.name for p in folder.iterdir()}
    assert {"ds_vicuna_complete.json", "rng_state_rank0.pt", "rng_state_rank1.pt", "hf",
            "zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt",
            "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= names
    assert {"config.json", "ds_vicuna_train_config.json", "tokenizer_config.json"} <= {
        p.name for p in (folder / "hf").iterdir()}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, total + 1)) and {0, 1} == {r["epoch"] for r in records}
    assert all(r["tokens_per_s"] > 0 and r["label_tokens"] > 0 for r in records)
    assert (out / "loss.png").stat().st_size > 1000
    assert records[-1]["loss"] < records[0]["loss"]


def test_resume_reproduces_every_later_loss(run_a):
    tmp, cfg, a = run_a
    out_b = tmp / "B"
    out_b.mkdir()
    shutil.copytree(tmp / "A/step-000002", out_b / "step-000002")
    (out_b / "latest").write_text("step-000002")
    (out_b / "step-000004").mkdir()  # a crash mid-save: shards without the completion marker
    (out_b / "step-000004/zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"partial")
    run_checked(deepspeed_command(2, DUMP, tmp / "b.pt", cfg, "--output_dir", out_b, "--resume", "auto",
                                  "--log_every", "2"), timeout=400)
    b = torch.load(tmp / "b.pt")
    assert sorted(b["losses"]) == list(range(3, a["step"] + 1))
    logged = [json.loads(line)["step"] for line in (out_b / "metrics.jsonl").read_text().splitlines()]
    assert logged == [s for s in range(3, a["step"] + 1) if s % 2 == 0 or s == a["step"]]  # log_every 2 + last
    for step, loss in b["losses"].items():
        assert loss == pytest.approx(a["losses"][step], rel=1e-6, abs=1e-7), step
    for name, value in a["params"].items():
        torch.testing.assert_close(b["params"][name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_export_equals_engine_parameters(run_a, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    import ds_vicuna
    from ds_vicuna.cli import main as cli_main
    from ds_vicuna.model_meta import read_model_meta

    tmp, _, a = run_a
    out = tmp_path / "export"
    assert cli_main(["export", str(tmp / "A"), str(out), "--dtype", "fp32"]) == 0
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    exported = dict(model.named_parameters())
    assert exported.keys() == a["params"].keys()
    for name, value in a["params"].items():
        assert value.numel() > 0 and value.abs().sum() > 0
        torch.testing.assert_close(exported[name].detach(), value, rtol=0, atol=0, msg=name)
    tok = AutoTokenizer.from_pretrained(out)
    messages = [{"role": "user", "content": "apple river"}, {"role": "assistant", "content": "stone cloud"},
                {"role": "user", "content": "seven"}, {"role": "assistant", "content": "eleven tiger"}]
    expected = ds_vicuna.encode_conversation(messages, tok, "vicuna_v1.1")["input_ids"]
    assert tok.apply_chat_template(messages, tokenize=True, return_dict=False) == expected
    generation = GenerationConfig.from_pretrained(out)
    assert tok.convert_tokens_to_ids("</s>") in ([generation.eos_token_id]
                                                 if isinstance(generation.eos_token_id, int) else generation.eos_token_id)
    meta = read_model_meta(out)
    assert meta["template"] == "vicuna_v1.1" and meta["stop_strings"] == ["</s>"] and meta["max_length"] == 512
