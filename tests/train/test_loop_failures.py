"""Bad input stops `ds-vicuna train` before training with one clear message and a non-zero exit."""
import subprocess
import sys

import pytest

from ds_vicuna.cli import main as cli_main
from tests.support.tiny_llama import REPO, make_tiny_model, subprocess_env, write_conversations


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fail")
    return make_tiny_model(tmp / "model"), write_conversations(tmp / "train.jsonl", n=8), tmp


def train_cli(capsys, *args) -> tuple[int, str]:
    code = cli_main(["train", *map(str, args)])
    return code, capsys.readouterr().err


def test_missing_data_file(tiny, capsys):
    model, _, tmp = tiny
    code, err = train_cli(capsys, "--model.name_or_path", model, "--train_path", tmp / "nope.json")
    assert code == 2 and "data.train_path" in err and "nope.json not found" in err


def test_no_data_given(tiny, capsys):
    code, err = train_cli(capsys, "--model.name_or_path", tiny[0])
    assert code == 2 and "data.train_path is required" in err


def test_unreadable_data_file(tiny, capsys, tmp_path):
    data = tmp_path / "locked.jsonl"
    data.write_text(tiny[1].read_text())
    data.chmod(0)
    try:
        import os

        if os.access(data, os.R_OK):
            pytest.skip("running as a user who can read anything")
        code, err = train_cli(capsys, "--model.name_or_path", tiny[0], "--train_path", data)
        assert code == 2 and "not readable" in err
    finally:
        data.chmod(0o644)


def test_missing_model(tiny, capsys, tmp_path):
    code, err = train_cli(capsys, "--model.name_or_path", tmp_path / "no-model", "--train_path", tiny[1])
    assert code == 2 and "model.name_or_path" in err and "no config.json" in err


def test_unknown_key_and_bad_type(tiny, capsys):
    code, err = train_cli(capsys, "--train_path", tiny[1], "--train.learnig_rate", "1")
    assert code == 2 and "unknown key train.learnig_rate" in err
    code, err = train_cli(capsys, "--train_path", tiny[1], "--epochs", "two")
    assert code == 2 and "train.epochs: expected int" in err


def test_offload_without_buildable_cpu_adam(tiny, capsys, monkeypatch):
    from deepspeed.ops.op_builder import CPUAdamBuilder

    def broken(self, verbose=True):
        raise RuntimeError("Error building extension 'cpu_adam': c++: not found")

    monkeypatch.setattr(CPUAdamBuilder, "load", broken)
    code, err = train_cli(capsys, "--model.name_or_path", tiny[0], "--train_path", tiny[1], "--max_length", "512",
                          "--deepspeed", REPO / "ds_configs/zero3_offload.json")
    assert code == 2 and "DeepSpeedCPUAdam" in err and "c++: not found" in err
    assert "train.deepspeed: zero3 (no offload)" in err


def test_max_length_beyond_the_models_positions_names_both(tiny, capsys):
    code, err = train_cli(capsys, "--model.name_or_path", tiny[0], "--train_path", tiny[1], "--max_length", "1024")
    assert code == 2, err
    assert "data.max_length 1024 is more than the 512 positions of model" in err and "model.rope_scaling" in err


def test_rope_scaling_covers_a_longer_max_length(tiny, tmp_path):
    from ds_vicuna.config import load_config
    from ds_vicuna.train.loop import preflight

    cfg = load_config(None, ["--model.name_or_path", str(tiny[0]), "--train_path", str(tiny[1]), "--max_length",
                             "1024", "--rope_scaling", "linear", "--deepspeed", "zero3",
                             "--output_dir", str(tmp_path / "out")])
    assert preflight(cfg)["zero_optimization"]["stage"] == 3


def test_template_auto_is_resolved_and_said(tiny, tmp_path, capsys):
    from ds_vicuna.config import load_config
    from ds_vicuna.train.loop import preflight

    cfg = load_config(None, ["--model.name_or_path", str(tiny[0]), "--train_path", str(tiny[1]), "--max_length",
                             "512", "--template", "auto", "--deepspeed", "zero3", "--output_dir", str(tmp_path)])
    preflight(cfg)
    assert cfg.model.template == "vicuna_v1.1"  # the tiny tokenizer has no chat template of its own
    assert "model.template: vicuna_v1.1 (template auto: the tokenizer has no chat template" in capsys.readouterr().out


def test_an_output_dir_holding_a_run_needs_resume_or_overwrite(tiny, capsys, tmp_path):
    from ds_vicuna.train.loop import clear_previous_run, previous_run

    out = tmp_path / "out"
    (out / "step-000003").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    (out / "cache").mkdir()
    code, err = train_cli(capsys, "--model.name_or_path", tiny[0], "--train_path", tiny[1], "--max_length", "512",
                          "--output_dir", out)
    assert code == 2, err
    assert f"train.output_dir: {out} already holds a run (step-000003, metrics.jsonl)" in err
    assert "--resume auto" in err and "--overwrite" in err
    assert [p.name for p in previous_run(out)] == ["step-000003", "metrics.jsonl"]
    clear_previous_run(out)
    assert previous_run(out) == [] and (out / "cache").is_dir()  # the tokenized data cache is kept


@pytest.mark.slow
def test_every_sample_longer_than_max_length(tiny):
    model, data, tmp = tiny
    proc = subprocess.run([sys.executable, "-m", "ds_vicuna.train", "--model.name_or_path", str(model),
                           "--train_path", str(data), "--max_length", "16", "--output_dir", str(tmp / "out"),
                           "--deepspeed", str(REPO / "ds_configs/zero3.json")],
                          capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "data.train_path" in proc.stderr and "more than max_length=16" in proc.stderr
    assert "ds-vicuna data split" in proc.stderr
    assert not (tmp / "out" / "metrics.jsonl").exists()
