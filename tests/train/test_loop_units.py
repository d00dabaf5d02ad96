"""Small pieces of the trainer: RoPE scaling, attention choice, argv split, rank slices, resume checks, plot."""
import json
import os
from pathlib import Path

import pytest

from ds_vicuna.train.checkpoint import CheckpointError, check_resume_compatible
from ds_vicuna.config import load_config
from ds_vicuna.train.loop import samples_of, step_batches
from ds_vicuna.train.cli import split_argv
from ds_vicuna.train.metrics import (matmul_params, peak_flops, peak_rss_bytes, plot_loss, step_profile,
                                     write_memory_report)
from ds_vicuna.train.build import (build_model_config, param_groups, pick_attn_implementation, pick_training_attention,
                                   enable_tf32, share_cpu_threads, share_cpu_threads_if_needed)
from tests.support.tiny_llama import make_tiny_model


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("units") / "model")


@pytest.mark.parametrize("kind", ["linear", "dynamic"])
def test_rope_scaling_reaches_max_length(tiny_model, kind):
    cfg = load_config(None, ["--rope_scaling", kind, "--max_length", "2048"])
    config = build_model_config(tiny_model, cfg)  # the tiny base has max_position_embeddings 512
    scaling = getattr(config, "rope_parameters", None) or config.rope_scaling
    assert scaling["rope_type"] == kind and scaling["factor"] == 4.0
    assert config.max_position_embeddings == 2048 and config.use_cache is False


def test_no_rope_scaling_by_default(tiny_model):
    config = build_model_config(tiny_model, load_config(None))
    assert config.max_position_embeddings == 512


def test_weight_decay_reaches_the_matrices_even_when_zero3_partitioned_them():
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    partitioned = torch.nn.Parameter(torch.empty(0))  # what zero.Init leaves in the module
    partitioned.ds_shape = torch.Size([8, 4])
    model.register_parameter("zero3_matrix", partitioned)
    decay, no_decay = param_groups(model, 0.1)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    assert sorted(tuple(getattr(p, "ds_shape", p.shape)) for p in decay["params"]) == [(4, 4), (8, 4)]
    assert [tuple(p.shape) for p in no_decay["params"]] == [(4,), (4,), (4,)]


def test_attention_choice_on_cpu():
    assert pick_attn_implementation("auto") == "sdpa"  # no CUDA here: flash-attn 2 is never picked
    assert pick_attn_implementation("eager") == "eager"


def test_cpu_ranks_share_the_cores_unless_told():
    import os

    import torch

    before = torch.get_num_threads()
    try:
        cores = len(os.sched_getaffinity(0))
        assert share_cpu_threads({"LOCAL_SIZE": "2"}) == max(1, cores // 2) == torch.get_num_threads()
        assert share_cpu_threads({"LOCAL_WORLD_SIZE": str(4 * cores)}) == 1
        assert share_cpu_threads({"OMP_NUM_THREADS": "3", "LOCAL_SIZE": "2"}) is None
    finally:
        torch.set_num_threads(before)


def test_cpu_threads_are_shared_whenever_the_optimizer_is_offloaded():
    """8 GPU ranks, each with CPU Adam: one thread per core in each would oversubscribe the host 8x."""
    import os

    import torch

    offload = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    on_gpu = {"zero_optimization": {"stage": 3}}
    before = torch.get_num_threads()
    try:
        cores = len(os.sched_getaffinity(0))
        ranks = {"LOCAL_WORLD_SIZE": "8"}
        assert share_cpu_threads_if_needed("cuda", offload, ranks) == max(1, cores // 8) == torch.get_num_threads()
        assert share_cpu_threads_if_needed("cuda", on_gpu, ranks) is None  # GPU work only: torch's default
        assert share_cpu_threads_if_needed("cpu", on_gpu, {"LOCAL_WORLD_SIZE": "2"}) == max(1, cores // 2)
        assert share_cpu_threads_if_needed("cuda", offload, {**ranks, "OMP_NUM_THREADS": "4"}) is None
    finally:
        torch.set_num_threads(before)


def test_packed_rows_on_cuda_use_flex_attention_never_a_dense_mask():
    from ds_vicuna.train.packed_attention import PACKED_SDPA

    assert pick_training_attention("auto", "pack", 1, "cuda") == "flex_attention"
    assert pick_training_attention("sdpa", "pack", 1, "cuda") == "flex_attention"
    assert pick_training_attention("auto", "pack", 1, "cpu") == PACKED_SDPA  # one SDPA per conversation
    assert pick_training_attention("auto", "group", 1, "cuda") == "sdpa"  # no packing: no mask to build
    assert pick_training_attention("flex_attention", "pack", 1, "cpu") == "flex_attention"
    assert pick_training_attention("auto", "pack", 2, "cuda") == PACKED_SDPA  # sequence parallel core attention


def test_fp32_on_cuda_runs_in_tf32_the_precision_its_mfu_peak_counts():
    import torch

    from ds_vicuna.train.metrics import peak_flops

    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert not enable_tf32("bf16", "cuda") and not enable_tf32("fp32", "cpu")
        assert torch.get_float32_matmul_precision() == "highest"
        assert enable_tf32("fp32", "cuda") and torch.get_float32_matmul_precision() == "high"  # TF32
        assert peak_flops("fp32", "NVIDIA H100 80GB HBM3") == peak_flops("bf16", "NVIDIA H100 80GB HBM3") / 2
    finally:
        torch.set_float32_matmul_precision(before)


def test_split_argv_drops_launcher_flag():
    assert split_argv(["cfg.yaml", "--local_rank=1", "--lr", "1"]) == ("cfg.yaml", ["--lr", "1"])
    assert split_argv(["--train_path", "x"]) == (None, ["--train_path", "x"])


def test_each_rank_takes_its_slice_of_the_step():
    class Launch:
        def __init__(self, rank):
            self.rank, self.world_size = rank, 2

    class Run:
        def __init__(self, rank, sp_size=1):
            self.launch, self.grad_accum, self.plans = Launch(rank), 2, [[[i] for i in range(10)]]
            self.dp_rank, self.dp_size = rank // sp_size, 2 // sp_size

    # step 2 of the epoch covers global micro-batches 4..7: rank 0 gets 4, 5 and rank 1 gets 6, 7
    assert step_batches(Run(0), 0, 4) == [[4], [5]] and step_batches(Run(1), 0, 4) == [[6], [7]]
    # both ranks of a sequence-parallel group train the same micro-batches (each its shard of their rows)
    assert step_batches(Run(0, sp_size=2), 0, 2) == step_batches(Run(1, sp_size=2), 0, 2) == [[2], [3]]
    assert samples_of([[1, 2], [3]]) == [1, 2, 3] and samples_of([4, 5]) == [4, 5]


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_a_step_covers_the_same_global_micro_batches_at_any_world_size(world):
    """The data position is global: at any world size the ranks of a step together run the same micro-batches,
    in plan order, and each micro-batch draws the same random numbers (its seed depends on its global index)."""
    from types import SimpleNamespace

    from ds_vicuna.train.elastic import micro_batch_seed
    from ds_vicuna.train.loop import rank_share

    plan = [[i, i + 100] for i in range(24)]
    runs = [SimpleNamespace(launch=SimpleNamespace(rank=r, world_size=world), dp_rank=r, grad_accum=8 // world,
                            plans=[plan]) for r in range(world)]
    for position in (0, 8, 16):
        assert [b for run in runs for b in step_batches(run, 0, position)] == plan[position:position + 8]
        seeds = [micro_batch_seed(42, 0, i) for run in runs for i in rank_share(run, position)]
        assert seeds == [micro_batch_seed(42, 0, i) for i in range(position, position + 8)]
    assert len({micro_batch_seed(42, e, i) for e in range(3) for i in range(1000)}) == 3000


def test_a_sequence_parallel_group_shares_its_micro_batches_and_seeds():
    """4 ranks in sequence-parallel pairs are 2 data-parallel replicas: both ranks of a pair run the same
    micro-batches with the same seeds, and the two pairs together cover the step's micro-batches once."""
    from types import SimpleNamespace

    from ds_vicuna.train.loop import rank_share

    plan = [[i] for i in range(16)]
    runs = [SimpleNamespace(launch=SimpleNamespace(rank=r, world_size=4), dp_rank=r // 2, grad_accum=4,
                            plans=[plan]) for r in range(4)]
    shares = [step_batches(run, 0, 8) for run in runs]
    assert shares[0] == shares[1] == plan[8:12] and shares[2] == shares[3] == plan[12:16]
    assert list(rank_share(runs[1], 8)) == list(rank_share(runs[0], 8)) == [8, 9, 10, 11]
    cfg = load_config(None, ["--global_batch_size", "8", "--micro_batch_size", "2", "--sequence_parallel_size", "2"])
    assert cfg.world_sizes() == [2, 4, 8]
    assert all(cfg.gradient_accumulation_steps(n) for n in cfg.world_sizes())


def test_resume_refuses_a_changed_shape():
    cfg = load_config(None, ["--train_path", "a.json"])
    saved = json.loads(json.dumps(cfg.to_dict()))
    check_resume_compatible(saved, cfg)
    saved["train"]["learning_rate"] = 1.0  # not shape-defining: fine
    check_resume_compatible(saved, cfg)
    saved["data"]["max_length"] = 4096
    with pytest.raises(CheckpointError, match="data.max_length: checkpoint 4096 vs now 2048"):
        check_resume_compatible(saved, cfg)


def test_loss_plot(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "loss": 3.0 / s}) + "\n" for s in range(1, 6))
                       + json.dumps({"step": 5, "eval_loss": 0.9}) + "\n")
    png = plot_loss(metrics, tmp_path / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_memory_report_and_step_profile_are_written_on_request(tmp_path):
    """What `train.memory_report` and `train.profile_step` write (benchmarks/bench_train.py reads them)."""
    import torch

    before = peak_rss_bytes()
    path = write_memory_report(tmp_path, 1, before, peak_rss_bytes())
    assert path.name == "memory_rank1.json"
    report = json.loads(path.read_text())
    assert report["rank"] == 1 and 0 < report["peak_rss_before_training_bytes"] <= report["peak_rss_bytes"]
    with step_profile(tmp_path, 0, enabled=False):
        torch.ones(8) @ torch.ones(8)
    assert not (tmp_path / "profile_rank0.txt").exists()
    with step_profile(tmp_path, 0, enabled=True):
        torch.ones(8, 8) @ torch.ones(8, 8)
    assert "aten::mm" in (tmp_path / "profile_rank0.txt").read_text()


def test_profile_step_must_be_positive(tmp_path):
    from ds_vicuna.config import ConfigError

    with pytest.raises(ConfigError, match="train.profile_step"):
        load_config(None, ["train.profile_step=0"])


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_mfu_counts_matmul_parameters(tied):
    import torch
    from tests.support.device_checks import tiny_llama

    model = tiny_llama("cpu", torch.float32, tied=tied)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()  # 512 x 64
    # the input embedding is a lookup; when the output layer shares it, its matmul counts once
    assert matmul_params(model) == (total if tied else total - embedding)


def test_peak_flops_by_device_name():
    assert peak_flops("bf16", "NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("bf16", "NVIDIA H100 PCIe") == 756e12  # the more specific entry wins
    assert peak_flops("bf16", "NVIDIA H200") == 989e12 and peak_flops("bf16", "NVIDIA H20") == 148e12
    assert peak_flops("fp32", "NVIDIA A100-SXM4-80GB") == 156e12
    assert peak_flops("bf16", "Some Future GPU") is None


def test_importing_the_trainer_does_not_import_torch():
    """`python -m ds_vicuna.train` imports the trainer before its stop-signal handler is installed: a slow torch
    import there would let a SIGTERM/SIGUSR1 during start-up kill the rank (tests/launch/test_launch_scripts.py)."""
    import subprocess
    import sys

    code = ("import sys, ds_vicuna.train, ds_vicuna.train.cli, ds_vicuna.train.__main__; "
            "print(sorted(m for m in sys.modules if m == 'torch'))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


def test_cpu_ops_build_in_a_folder_of_this_environment_and_say_so(monkeypatch, tmp_path, capsys):
    import sys

    from deepspeed.ops.op_builder import CPUAdamBuilder

    import ds_vicuna.train.build as build

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder = build.extensions_dir()
    assert folder.parent == tmp_path / "ds-vicuna" / "torch_extensions"
    assert folder.name.startswith(f"{Path(sys.prefix).name}-") and folder == build.default_extensions_dir()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(folder)  # exported: the ranks we start build there too
    monkeypatch.setattr(CPUAdamBuilder, "load", lambda self, verbose=True: None)
    build.check_cpu_adam()
    out = capsys.readouterr().out
    assert f"compiling DeepSpeed's CPU Adam op into {folder}" in out and "CPU Adam op built in" in out
    (folder / "cpu_adam").mkdir(parents=True)
    (folder / "cpu_adam" / "cpu_adam.so").write_bytes(b"")
    build.check_cpu_adam()
    assert capsys.readouterr().out == ""  # already built: nothing to say
