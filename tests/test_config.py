"""Config loading, overrides, validation, DeepSpeed filling, and every config file in the repo."""
import json
from pathlib import Path

import pytest

from ds_vicuna.config import (Config, ConfigError, bundled_deepspeed_configs, example_configs, fill_deepspeed_config,
                              load_config, load_deepspeed_config, offloads_optimizer, parse_overrides,
                              resolve_precision)

REPO = Path(__file__).resolve().parents[1]


def test_vicuna_defaults():
    cfg = Config()
    assert (cfg.train.learning_rate, cfg.train.lr_scheduler, cfg.train.warmup_ratio, cfg.train.weight_decay,
            cfg.train.epochs, cfg.train.global_batch_size, cfg.data.max_length, cfg.model.template) == \
        (2e-5, "cosine", 0.03, 0.0, 3, 128, 2048, "vicuna_v1.1")
    assert cfg.model.gradient_checkpointing is True


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_training_config_loads(path):
    cfg = load_config(path)
    ds = load_deepspeed_config(cfg.train.deepspeed)
    cfg.gradient_accumulation_steps(1)
    filled = fill_deepspeed_config(ds, micro_batch_size=cfg.train.micro_batch_size, grad_accum=2, world_size=1,
                                   hidden_size=64, precision="fp32", max_grad_norm=1.0)
    assert filled["train_batch_size"] == 2 * cfg.train.micro_batch_size


@pytest.mark.parametrize("path", sorted((REPO / "ds_configs").glob("*.json")), ids=lambda p: p.name)
def test_every_deepspeed_config_fills(path):
    ds = load_deepspeed_config(path)
    out = fill_deepspeed_config(ds, micro_batch_size=2, grad_accum=4, world_size=8, hidden_size=4096,
                                precision="bf16", max_grad_norm=1.0)
    assert (out["train_micro_batch_size_per_gpu"], out["gradient_accumulation_steps"], out["train_batch_size"]) \
        == (2, 4, 64)
    zero = out["zero_optimization"]
    assert zero["reduce_bucket_size"] == 4096 * 4096
    if zero["stage"] == 3:
        assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 4096 * 4096)
        assert zero["stage3_param_persistence_threshold"] == 40960
    assert out["bf16"]["enabled"] and not out["fp16"]["enabled"]
    assert out["gradient_clipping"] == 1.0
    assert "auto" not in json.dumps(out)
    assert ds["zero_optimization"]["reduce_bucket_size"] == "auto"  # the input is not modified


def test_offload_config_offloads_both():
    ds = load_deepspeed_config(REPO / "ds_configs/zero3_offload.json")
    assert offloads_optimizer(ds)
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert not offloads_optimizer(load_deepspeed_config(REPO / "ds_configs/zero3.json"))


def test_sequence_parallel_batch_counts_replicas():
    ds = load_deepspeed_config(REPO / "ds_configs/zero3.json")
    out = fill_deepspeed_config(ds, micro_batch_size=1, grad_accum=2, world_size=8, hidden_size=8,
                                precision="fp32", max_grad_norm=1.0, sequence_parallel_size=4)
    assert out["train_batch_size"] == 1 * 2 * 2 and out["sequence_parallel_size"] == 4
    assert "sequence_parallel_size" not in fill_deepspeed_config(ds, micro_batch_size=1, grad_accum=1, world_size=2,
                                                                 hidden_size=8, precision="fp32", max_grad_norm=1.0)


def test_fp16_gets_dynamic_loss_scaling():
    ds = load_deepspeed_config(REPO / "ds_configs/zero2.json")
    out = fill_deepspeed_config(ds, micro_batch_size=1, grad_accum=1, world_size=1, hidden_size=8,
                                precision="fp16", max_grad_norm=1.0)
    assert out["fp16"]["enabled"] and out["fp16"]["loss_scale"] == 0 and not out["bf16"]["enabled"]


@pytest.mark.parametrize("requested,device,bf16,expected", [
    ("auto", "cpu", False, "fp32"), ("auto", "cpu", True, "fp32"), ("bf16", "cpu", True, "bf16"),
    ("auto", "cuda", True, "bf16"), ("auto", "cuda", False, "fp16"), ("fp16", "cuda", True, "fp16")])
def test_resolve_precision(requested, device, bf16, expected):
    assert resolve_precision(requested, device, bf16) == expected


@pytest.mark.parametrize("requested,device,bf16", [("bf16", "cpu", False), ("bf16", "cuda", False),
                                                   ("fp16", "cpu", True)])
def test_resolve_precision_rejects(requested, device, bf16):
    with pytest.raises(ConfigError, match="train.precision"):
        resolve_precision(requested, device, bf16)


def test_overrides_dotted_bare_and_equals(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  train_path: a.json\ntrain:\n  learning_rate: 1e-5\n")
    cfg = load_config(path, ["--train.learning_rate", "1e-4", "--max_length", "512", "model.rope_scaling=linear",
                             "--gradient-checkpointing=false", "--max_steps", "null"])
    assert cfg.train.learning_rate == 1e-4 and isinstance(cfg.train.learning_rate, float)
    assert cfg.data.max_length == 512 and cfg.model.rope_scaling == "linear"
    assert cfg.model.gradient_checkpointing is False and cfg.train.max_steps is None
    assert parse_overrides(["--a", "1", "b=2"]) == [("a", "1"), ("b", "2")]


def test_grad_accum_derived_from_global_batch():
    cfg = load_config(None, ["--global_batch_size", "128", "--micro_batch_size", "2"])
    assert cfg.gradient_accumulation_steps(8) == 8 and cfg.gradient_accumulation_steps(1) == 64
    with pytest.raises(ConfigError,
                       match=r"x world size \(3\); world sizes that can train it: 1, 2, 4, 8, 16, 32, 64 "):
        cfg.gradient_accumulation_steps(3)
    assert load_config(None, ["--global_batch_size", "12", "--micro_batch_size", "2"]).world_sizes() == [1, 2, 3, 6]


@pytest.mark.parametrize("text,overrides,match", [
    ("train:\n  learnin_rate: 1\n", [], r"unknown key train.learnin_rate"),
    ("trian:\n  epochs: 1\n", [], r"unknown section"),
    ("train:\n  epochs: three\n", [], r"train.epochs: expected int, got str"),
    ("train:\n  epochs: 1.5\n", [], r"train.epochs: expected int"),
    ("model:\n  gradient_checkpointing: 1\n", [], r"expected bool"),
    ("", ["--nonsense", "1"], r"unknown key"),
    ("", ["--model.nope", "1"], r"unknown key model.nope"),
    ("", ["--train.warmup_ratio", "1.5"], r"warmup_ratio"),
    ("", ["--global_batch_size", "10", "--micro_batch_size", "4"], r"multiple of"),
    ("", ["--batching", "zip"], r"data.batching must be one of"),
    ("", ["--rope_scaling", "yarn"], r"model.rope_scaling"),
    ("- 1\n- 2\n", [], r"expected a mapping"),
    ("train: [\n", [], r"not valid YAML"),
    ("", ["--epochs"], r"has no value"),
])
def test_bad_configs_are_named(tmp_path, text, overrides, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(path, overrides)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_deepspeed_config_must_not_set_batch(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_batch_size": 64}))
    with pytest.raises(ConfigError, match="derived from train.global_batch_size"):
        load_deepspeed_config(path)
    path.write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_deepspeed_config(path)


def test_train_path_may_be_a_weighted_mix(tmp_path):
    from ds_vicuna.config import DataSource

    path = tmp_path / "mix.yaml"
    path.write_text("data:\n  train_path:\n    - sharegpt.jsonl\n    - {path: identity.jsonl, weight: 3}\n"
                    "    - {path: domain.jsonl, weight: 0.5}\n")
    cfg = load_config(path)  # relative to the config file's folder
    assert cfg.data.train_sources() == [DataSource(str(tmp_path / "sharegpt.jsonl"), 1.0),
                                        DataSource(str(tmp_path / "identity.jsonl"), 3.0),
                                        DataSource(str(tmp_path / "domain.jsonl"), 0.5)]
    assert cfg.data.named_paths()[1] == ("data.train_path[1]", str(tmp_path / "identity.jsonl"))
    single = load_config(None, ["--train_path", "a.jsonl", "--eval_path", "b.jsonl"])  # a plain path still works
    assert single.data.train_sources() == [DataSource("a.jsonl")]
    assert single.data.named_paths() == [("data.train_path", "a.jsonl"), ("data.eval_path", "b.jsonl")]
    override = load_config(None, ["--train_path", "[a.jsonl, {path: b.jsonl, weight: 2}]"])
    assert [s.weight for s in override.data.train_sources()] == [1.0, 2.0]


@pytest.mark.parametrize("value,match", [
    ("[]", r"data.train_path: an empty list"),
    ("[a.jsonl, {path: b.jsonl, weight: 0}]", r"data.train_path\[1\].weight: expected a number > 0, got 0"),
    ("[{path: b.jsonl, wieght: 2}]", r"data.train_path\[0\]: unknown key\(s\) wieght"),
    ("[{weight: 2}]", r"data.train_path\[0\]: expected a path or"),
    ("[a.jsonl, 7]", r"data.train_path\[1\]: expected a path or"),
    ("7", r"data.train_path: expected str, got int"),
])
def test_bad_mixes_are_named(value, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, ["--train_path", value])


# ------------------------------------------------------------------------------ bundled configs, path resolution


def test_bundled_deepspeed_names_are_the_repository_files_and_the_default_is_one():
    bundled = bundled_deepspeed_configs()
    assert sorted(bundled) == ["zero2", "zero3", "zero3_offload"]
    for name, path in bundled.items():
        assert load_deepspeed_config(name) == json.loads((REPO / "ds_configs" / f"{name}.json").read_text())
        assert path.name == f"{name}.json"
    assert Config().train.deepspeed == "zero3_offload"
    assert offloads_optimizer(load_deepspeed_config(Config().train.deepspeed))


def test_an_unknown_deepspeed_config_names_the_bundled_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"train.deepspeed: .*zero4 not found; give a JSON file or a bundled "
                                          r"name: zero2, zero3, zero3_offload"):
        load_deepspeed_config("zero4")


def test_bad_deepspeed_json_names_line_and_column(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text('{"zero_optimization": {"stage": 3},\n  "bf16": {"enabled": tru}}\n')
    with pytest.raises(ConfigError, match=r"ds.json: not valid JSON \(line 2, column 23: Expecting value\)"):
        load_deepspeed_config(bad)


def test_a_bundled_example_loads_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert sorted(example_configs()) == sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))
    cfg = load_config("demo", ["--data.train_path", "mine.jsonl"])
    assert (cfg.train.deepspeed, cfg.data.train_path, cfg.train.output_dir) == \
        ("zero3_offload", "mine.jsonl", "runs/demo/train")
    with pytest.raises(ConfigError, match=r"config file nope.yaml not found \(bundled examples: demo, "):
        load_config("nope.yaml")


def test_relative_inputs_in_a_config_file_are_read_from_its_folder(tmp_path, monkeypatch):
    folder = tmp_path / "project" / "configs"
    folder.mkdir(parents=True)
    (folder / "run.yaml").write_text(
        "model: {name_or_path: ../models/tiny}\n"
        "data: {train_path: [a.jsonl, {path: ../data/b.jsonl, weight: 2}, /abs/c.jsonl], eval_path: dev.jsonl}\n"
        "train: {deepspeed: my_ds.json, output_dir: runs/out, resume: ckpt/step-000002}\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config("project/configs/run.yaml", ["--data.eval_path", "here.jsonl"])
    base = "project/configs"
    assert cfg.model.name_or_path == "project/models/tiny"
    assert cfg.data.train_path == [f"{base}/a.jsonl", {"path": "project/data/b.jsonl", "weight": 2}, "/abs/c.jsonl"]
    assert cfg.data.eval_path == "here.jsonl"  # the command line is relative to the current folder
    assert (cfg.train.deepspeed, cfg.train.resume) == (f"{base}/my_ds.json", f"{base}/ckpt/step-000002")
    assert cfg.train.output_dir == "runs/out"  # outputs go where the run is started
    (folder / "names.yaml").write_text("model: {name_or_path: embedded}\ntrain: {deepspeed: zero3, resume: auto}\n")
    names = load_config(folder / "names.yaml")
    assert (names.model.name_or_path, names.train.deepspeed, names.train.resume) == ("embedded", "zero3", "auto")


def test_a_yes_no_key_alone_on_the_command_line_means_true():
    assert parse_overrides(["--overwrite", "--train.lr", "1", "--memory_report"]) == \
        [("overwrite", "true"), ("train.lr", "1"), ("memory_report", "true")]
    assert load_config(None, ["--overwrite", "--data.train_path", "x.jsonl"]).train.overwrite is True
    with pytest.raises(ConfigError, match="train.overwrite and train.resume .*contradict"):
        load_config(None, ["--overwrite", "--resume", "auto"])


def test_lora_section_is_typed_and_checked(tmp_path):
    """model.lora from YAML and from dotted overrides; contradictions named by field."""
    from ds_vicuna.config import ConfigError, LoraConfig, load_config

    path = tmp_path / "cfg.yaml"
    path.write_text("model:\n  lora: {r: 8, target_modules: [q_proj, v_proj], modules_to_save: [lm_head]}\n")
    cfg = load_config(path)
    assert cfg.model.lora == LoraConfig(r=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    assert cfg.to_dict()["model"]["lora"]["alpha"] == 32.0
    assert load_config(None, ["--model.lora", "{}"]).model.lora == LoraConfig()
    assert load_config(None, ["model.lora.r=4", "--model.lora.alpha", "8"]).model.lora == LoraConfig(r=4, alpha=8.0)
    assert load_config(None).model.lora is None  # full fine-tuning unless asked
    bad = {("--model.lora.r", "0"): "model.lora.r must be > 0",
           ("--model.lora.dropout", "1.5"): r"model.lora.dropout must be in \[0, 1\)",
           ("--model.lora.rank", "4"): "unknown key model.lora.rank; known: alpha, dropout",
           ("--model.lora", "16"): "model.lora: expected a mapping of r, alpha",
           ("--model.lora.target_modules", "[lm_head]"): "lm_head cannot take an adapter",
           ("--model.lora.target_modules", "[]"): "model.lora.target_modules: expected",
           ("--model.quantization", "{}"): "model.quantization freezes the base in 4 bits",
           ("--model.lora.target_modules", "[q_proj]", "--model.lora.modules_to_save", "[q_proj]"):
               "q_proj is in both target_modules and modules_to_save"}
    for override, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            load_config(None, list(override))
    with pytest.raises(ConfigError, match="model.quantization.type must be one of nf4, fp4"):
        load_config(None, ["--model.lora", "{}", "--model.quantization.type", "int8"])
    quant = load_config(None, ["--model.lora", "{}", "--model.quantization", "{}"]).model.quantization
    assert (quant.bits, quant.type, quant.double_quant, quant.compute_dtype) == (4, "nf4", True, "bf16")


def test_qlora_without_bitsandbytes_stops_before_loading_saying_what_to_install(monkeypatch):
    """No bitsandbytes: the trainer says which package to install instead of failing inside transformers."""
    import importlib.util

    from ds_vicuna.config import QuantizationConfig
    from ds_vicuna.train.lora import quantization_config

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "bitsandbytes" else real(name, *args))
    with pytest.raises(ValueError, match=r"needs bitsandbytes: pip install 'ds-vicuna\[qlora\]'"):
        quantization_config(QuantizationConfig())


def test_qlora_on_the_cpu_with_a_bitsandbytes_too_old_for_it_says_which_version(monkeypatch):
    """bitsandbytes before 0.46 has 4-bit kernels for CUDA only: on a CPU box the trainer names the version needed."""
    import importlib.metadata

    import torch

    from ds_vicuna.config import QuantizationConfig
    from ds_vicuna.train.lora import quantization_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.45.5")
    with pytest.raises(ValueError, match=r"needs bitsandbytes >= 0.46 \(installed: 0.45.5"):
        quantization_config(QuantizationConfig())
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.50.2")
    assert quantization_config(QuantizationConfig()).load_in_4bit
