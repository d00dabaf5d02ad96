"""Exact resume and consolidated export on CPU: 2 ranks, ZeRO-3 + CPU offload (DeepSpeedCPUAdam), the real
`deepspeed` launcher, a tiny Llama with attention dropout (training draws random numbers) and weight decay on
the matrices only (two optimizer param groups). Run A trains ~6 steps over 2 epochs saving every 2; run B starts
from A's step-2 checkpoint (next to a half-written step-4 folder that must be ignored) and must reproduce A's
losses; the elastic runs resume A's 2-rank checkpoint on 1 rank, and a 1-rank checkpoint on 2 ranks."""
import json
import shutil
import subprocess
import time

import pytest
import torch

from tests.support.tiny_llama import (ELASTIC_LOSS_RTOL, ELASTIC_WEIGHT_ATOL, REPO, copy_checkpoint,
                                      deepspeed_command, run_checked, subprocess_env, write_resume_run)

pytestmark = pytest.mark.slow
DUMP = REPO / "tests/support/scripts/train_and_dump.py"


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    cfg = write_resume_run(tmp)
    run_checked(deepspeed_command(2, DUMP, tmp / "a.pt", cfg, "--output_dir", tmp / "A", "--memory_report", "true",
                                  "--profile_step", "2"), timeout=400)
    return tmp, cfg, torch.load(tmp / "a.pt")


def run_ranks(ranks: int, dump, cfg, *args, expect: int = 0, timeout: int = 400) -> str:
    """The deepspeed launcher with `ranks` CPU ranks; returns its output, failing unless it exits `expect`."""
    proc = subprocess.run(deepspeed_command(ranks, DUMP, dump, cfg, *args), capture_output=True, text=True,
                          timeout=timeout, env=subprocess_env())
    assert proc.returncode == expect, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


def assert_same_run(got: dict, reference: dict, steps, loss_rtol: float, weight_atol: float) -> None:
    """`got`'s loss at each of `steps` and its final weights equal `reference`'s within the bounds."""
    assert sorted(got["losses"]) == list(steps)
    for step in steps:
        assert got["losses"][step] == pytest.approx(reference["losses"][step], rel=loss_rtol, abs=1e-7), step
    assert got["params"].keys() == reference["params"].keys()
    for name, value in reference["params"].items():
        torch.testing.assert_close(got["params"][name], value, rtol=0, atol=weight_atol, msg=name)


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
    for rank in (0, 1):  # asked for with train.memory_report and train.profile_step (benchmarks read them)
        memory = json.loads((out / f"memory_rank{rank}.json").read_text())
        assert 0 < memory["peak_rss_before_training_bytes"] <= memory["peak_rss_bytes"]
        assert "Self CPU" in (out / f"profile_rank{rank}.txt").read_text()


def test_resume_reproduces_every_later_loss(run_a):
    tmp, cfg, a = run_a
    out_b = copy_checkpoint(tmp / "A", "step-000002", tmp / "B")
    (out_b / "step-000004").mkdir()  # a crash mid-save: shards without the completion marker
    (out_b / "step-000004/zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"partial")
    run_checked(deepspeed_command(2, DUMP, tmp / "b.pt", cfg, "--output_dir", out_b, "--resume", "auto",
                                  "--log_every", "2"), timeout=400)
    b = torch.load(tmp / "b.pt")
    assert sorted(b["losses"]) == list(range(3, a["step"] + 1))
    logged = [json.loads(line)["step"] for line in (out_b / "metrics.jsonl").read_text().splitlines()]
    assert logged == [s for s in range(3, a["step"] + 1) if s % 2 == 0 or s == a["step"]]  # log_every 2 + last
    assert_same_run(b, a, range(3, a["step"] + 1), loss_rtol=1e-6, weight_atol=1e-6)
    assert not (out_b / "step-000002/universal").exists()  # same world size: loaded as saved


def test_two_rank_checkpoint_resumes_on_one_rank(run_a):
    """Capacity shrank: A's 2-rank ZeRO-3 checkpoint of step 2 continues on 1 rank (converted once to DeepSpeed's
    universal format beside the original) and reproduces A's later losses and final weights."""
    tmp, cfg, a = run_a
    out = copy_checkpoint(tmp / "A", "step-000002", tmp / "shrink")
    log = run_ranks(1, tmp / "shrink.pt", cfg, "--output_dir", out, "--resume", "auto")
    assert "step-000002 was written by 2 rank(s), this run has 1: converting it once" in log
    assert f"resumed from {out}/step-000002 at step 2" in log
    # DeepSpeed 0.19's ZeRO-3 universal load gives every param group group 0's hyperparameters (norms would decay)
    assert "restored the saved ones: group 1 weight_decay 0.1 -> 0.0" in log
    universal = out / "step-000002/universal"
    assert (universal / "ds_vicuna_universal_complete.json").is_file()
    assert (universal / "zero/model.embed_tokens.weight/exp_avg_sq.pt").is_file()
    assert_same_run(torch.load(tmp / "shrink.pt"), a, range(3, a["step"] + 1), ELASTIC_LOSS_RTOL,
                    ELASTIC_WEIGHT_ATOL)
    final = json.loads((out / f"step-{a['step']:06d}/ds_vicuna_complete.json").read_text())
    assert final["world_size"] == 1 and len(list((out / f"step-{a['step']:06d}").glob("rng_state_rank*.pt"))) == 1


def test_one_rank_checkpoint_resumes_on_two_ranks(run_a):
    """Capacity grew: 1 rank trains 2 steps and stops (train.stop_after_steps: the preemption path, checkpoint
    and stop, without the signal; tests/launch/test_launch_scripts.py sends real ones); 2 ranks continue from it.
    Both halves match the uninterrupted 2-rank run A step by step."""
    tmp, cfg, a = run_a
    out = tmp / "grow"
    run_ranks(1, tmp / "grow1.pt", cfg, "--output_dir", out, "--stop_after_steps", "2")
    assert (out / "latest").read_text() == "step-000002"
    one = torch.load(tmp / "grow1.pt")
    for step in (1, 2):
        assert one["losses"][step] == pytest.approx(a["losses"][step], rel=ELASTIC_LOSS_RTOL, abs=1e-7), step
    log = run_ranks(2, tmp / "grow2.pt", cfg, "--output_dir", out, "--resume", "auto")
    assert "step-000002 was written by 1 rank(s), this run has 2: converting it once" in log
    assert_same_run(torch.load(tmp / "grow2.pt"), a, range(3, a["step"] + 1), ELASTIC_LOSS_RTOL,
                    ELASTIC_WEIGHT_ATOL)


def test_zero2_checkpoint_resumes_on_one_rank_and_exports(run_a, tmp_path):
    """ZeRO-2 (ds_configs/zero2.json, torch AdamW, no offload) takes DeepSpeed's ZeRO-1/2 universal path: 2 ranks
    for 6 steps, then A's step-2 checkpoint of that run continues on 1 rank like it; the export (gathered whole
    by DeepSpeed for ZeRO-1/2) equals the engine's parameters."""
    from transformers import AutoModelForCausalLM

    from ds_vicuna.cli import main as cli_main

    tmp, cfg, _ = run_a
    zero2 = ["--deepspeed", str(REPO / "ds_configs/zero2.json")]
    run_ranks(2, tmp / "z2.pt", cfg, "--output_dir", tmp / "Z2", *zero2)
    reference = torch.load(tmp / "z2.pt")
    out = copy_checkpoint(tmp / "Z2", "step-000002", tmp / "z2-shrink")
    log = run_ranks(1, tmp / "z2-shrink.pt", cfg, "--output_dir", out, "--resume", "auto", *zero2)
    assert "ZeRO stage 2" in log and "was written by 2 rank(s), this run has 1: converting it once" in log
    assert_same_run(torch.load(tmp / "z2-shrink.pt"), reference, range(3, reference["step"] + 1),
                    ELASTIC_LOSS_RTOL, ELASTIC_WEIGHT_ATOL)
    assert cli_main(["export", str(tmp / "Z2"), str(tmp_path / "z2-export")]) == 0
    exported = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "z2-export").named_parameters())
    for name, value in reference["params"].items():
        assert torch.equal(exported[name].detach(), value), name


def test_a_world_size_that_cannot_split_the_global_batch_stops_at_once(run_a):
    """3 ranks for a global batch of 4 micro-batches: every rank stops before importing torch or meeting the
    others, naming the sizes that work, and nothing is converted or written."""
    import os
    import sys

    tmp, cfg, _ = run_a
    out = tmp / "three"
    shutil.copytree(tmp / "A/step-000002", out / "step-000002")
    started = time.monotonic()
    proc = subprocess.run(deepspeed_command(3, "--module", "ds_vicuna.train", cfg, "--output_dir", out,
                                            "--resume", "auto"),
                          capture_output=True, text=True, timeout=300, env=subprocess_env())
    launched = time.monotonic() - started
    # Three ranks write to one pipe at once: a line of one can end up joined to another's, so the complete
    # message is counted, not lines.
    expected = ("ds-vicuna train: error: train.global_batch_size (4) is not a multiple of micro_batch_size (1) x "
                "world size (3); world sizes that can train it: 1, 2, 4 (or, on a fresh start, a global batch "
                "divisible by 3)")
    output = proc.stderr + proc.stdout
    assert proc.returncode != 0, output[-3000:]
    assert output.count(expected) == 3 == output.count("ds-vicuna train: error:"), output[-3000:]
    assert "rank 0/3" not in proc.stdout and not (out / "step-000002/universal").exists()
    assert not (out / "metrics.jsonl").exists()
    # one rank alone, as the launcher starts it: the message comes before torch is even imported
    env = {**subprocess_env(), "RANK": "1", "WORLD_SIZE": "3", "LOCAL_RANK": "1"}
    started = time.monotonic()
    rank = subprocess.run([sys.executable, "-m", "ds_vicuna.train", str(cfg), "--output_dir", str(out), "--resume",
                           "auto"], capture_output=True, text=True, timeout=60, env=env, cwd=os.getcwd())
    alone = time.monotonic() - started
    print(f"3-rank launch exited after {launched:.1f} s (the launcher's own start included); one rank: {alone:.2f} s")
    assert rank.returncode == 2 and expected in rank.stderr and alone < 5


def test_universal_copy_is_made_once_and_carries_only_what_the_loader_reads(run_a, tmp_path):
    """DeepSpeed 0.19's ds_to_universal writes rank 0's whole optimizer partition (fp32 weights and both Adam
    moments) into zero/optimizer_state.pt, which every rank of the resumed job loads; ours keeps the step count
    and the param groups. A second conversion of the same folder reuses the copy."""
    import subprocess
    import sys

    from ds_vicuna.train.elastic import OPTIMIZER_STATE_FILE, convert_to_universal, saved_world_size

    tmp, _, _ = run_a
    folder = tmp_path / "step-000002"
    shutil.copytree(tmp / "A/step-000002", folder)
    assert saved_world_size(folder) == 2
    plain = tmp_path / "plain"
    subprocess.run([sys.executable, "-c", "from deepspeed.checkpoint.ds_to_universal import main, parse_arguments; "
                    "main(parse_arguments())", "--input_folder", str(folder), "--output_folder", str(plain),
                    "--num_extract_workers", "1", "--num_merge_workers", "1"], check=True, capture_output=True,
                   env=subprocess_env())
    as_written = torch.load(plain / OPTIMIZER_STATE_FILE, weights_only=False)
    partition = as_written["fp32_flat_groups"][0].numel()
    moments = as_written["optimizer_state_dict"]["state"][0]
    assert partition > 0 and moments["exp_avg"].numel() == moments["exp_avg_sq"].numel() == partition  # the bloat

    universal = convert_to_universal(folder)
    slim = torch.load(universal / OPTIMIZER_STATE_FILE, weights_only=False)
    assert "fp32_flat_groups" not in slim
    assert all(set(s) == {"step"} for s in slim["optimizer_state_dict"]["state"].values())
    assert [g["weight_decay"] for g in slim["optimizer_state_dict"]["param_groups"]] == [0.1, 0.0]
    assert (universal / OPTIMIZER_STATE_FILE).stat().st_size * 10 < (plain / OPTIMIZER_STATE_FILE).stat().st_size
    assert not (folder / "latest_universal").exists() and not list(folder.glob(".universal.tmp-*"))
    marker = universal / "ds_vicuna_universal_complete.json"
    made = marker.stat().st_mtime_ns
    assert convert_to_universal(folder) == universal and marker.stat().st_mtime_ns == made


def test_export_equals_engine_parameters(run_a, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    import ds_vicuna
    from ds_vicuna.cli import main as cli_main
    from ds_vicuna.model.card import read_model_meta

    tmp, _, a = run_a
    out = tmp_path / "export"
    assert cli_main(["export", str(tmp / "A"), str(out)]) == 0  # default dtype: the training precision, fp32 here
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
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
    eos_ids = [generation.eos_token_id] if isinstance(generation.eos_token_id, int) else generation.eos_token_id
    assert tok.convert_tokens_to_ids("</s>") in eos_ids
    meta = read_model_meta(out)
    assert meta["template"] == "vicuna_v1.1" and meta["stop_strings"] == ["</s>"] and meta["max_length"] == 512


def test_export_bf16_in_shards_equals_the_engine_parameters_cast(run_a, tmp_path, capsys):
    """--dtype bf16 --max-shard-size 100KB: Hugging Face's sharded layout with its index, each tensor exactly the
    engine's parameter cast to bf16, and `transformers` loads the folder as a bf16 model."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from ds_vicuna.cli import main as cli_main

    tmp, _, a = run_a
    out = tmp_path / "bf16"
    (out / "model-00001-of-00009.safetensors").parent.mkdir()
    (out / "model-00001-of-00009.safetensors").write_bytes(b"a stale shard of an earlier export")
    assert cli_main(["export", str(tmp / "A"), str(out), "--dtype", "bf16", "--max-shard-size", "100KB"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted({*index["weight_map"].values()})
    assert len(shards) > 1 and sorted(p.name for p in out.glob("*.safetensors")) == shards
    assert set(index["weight_map"]) == set(a["params"])
    assert index["metadata"]["total_size"] == sum(v.numel() * 2 for v in a["params"].values())
    for shard in shards:
        with safe_open(out / shard, "pt") as weights:
            tensors = {name: weights.get_tensor(name) for name in weights.keys()}
        assert sum(t.numel() * 2 for t in tensors.values()) <= 100_000 or len(tensors) == 1  # a big tensor: alone
        for name, tensor in tensors.items():
            assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, a["params"][name].to(torch.bfloat16)), name
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16 and json.loads((out / "ds_vicuna.json").read_text())["dtype"] == "bf16"
    assert cli_main(["export", str(tmp / "A"), str(tmp_path / "x"), "--max-shard-size", "5XB"]) == 2
    assert "--max-shard-size: expected a size like 5GB" in capsys.readouterr().err
