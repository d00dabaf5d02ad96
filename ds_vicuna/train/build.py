"""What the trainer builds before its loop: model (partitioned under ZeRO-3) and the DeepSpeed engine.

    tokenizer = load_tokenizer(model_path, "vicuna_v1.1")      # ds_vicuna.model.tokenizer
    config = build_model_config(model_path, cfg)
    model = build_model(model_path, config, tokenizer, cfg, ds, precision)
    engine = build_engine(model, ds, cfg, total_steps)
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from ds_vicuna.config import Config, ConfigError, offloads_optimizer
from ds_vicuna.model.loading import torch_dtype


EXTENSIONS_ENV = "TORCH_EXTENSIONS_DIR"


def default_extensions_dir() -> Path:
    """Where this Python environment keeps DeepSpeed's compiled ops: one folder per environment (its prefix and
    torch version), so two virtualenvs never rebuild each other's ops in torch's shared ~/.cache/torch_extensions."""
    import hashlib
    import sys

    import torch

    key = hashlib.sha1(f"{sys.prefix}|{torch.__version__}".encode()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "ds-vicuna" / "torch_extensions" / f"{Path(sys.prefix).name}-{key}"


def extensions_dir() -> Path:
    """`$TORCH_EXTENSIONS_DIR` when set, else (and then exported, for the ranks we start) this environment's own."""
    if not os.environ.get(EXTENSIONS_ENV):
        os.environ[EXTENSIONS_ENV] = str(default_extensions_dir())
    return Path(os.environ[EXTENSIONS_ENV])


def check_cpu_adam() -> None:
    """Build (or load the cached build of) DeepSpeedCPUAdam, which optimizer offload needs, saying so: the first
    build in an environment compiles C++ for minutes.

    Raises:
        ConfigError: it cannot be built, with what to do instead.
    """
    import time

    folder = extensions_dir()
    built = any(folder.glob("cpu_adam*/*.so"))
    loud = os.environ.get("LOCAL_RANK", "0") == "0"  # one line per machine, not one per rank
    if loud and not built:
        print(f"[ds-vicuna] compiling DeepSpeed's CPU Adam op into {folder} (optimizer offload needs it; once per "
              "environment, a few minutes; set TORCH_EXTENSIONS_DIR to share a build)", flush=True)
    started = time.perf_counter()
    try:
        from deepspeed.ops.op_builder import CPUAdamBuilder

        CPUAdamBuilder().load(verbose=False)
    except Exception as err:  # noqa: BLE001 - any build failure means the same thing to the user
        raise ConfigError(
            "train.deepspeed offloads the optimizer to CPU, which needs DeepSpeedCPUAdam, but it cannot be built "
            f"here ({type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else err}). "
            "Install a C++ compiler (g++) and ninja, or use train.deepspeed: zero3 (no offload).") from None
    if loud and not built:
        print(f"[ds-vicuna] CPU Adam op built in {time.perf_counter() - started:.0f} s ({folder})", flush=True)


def build_model_config(model_path: Path, cfg: Config):
    """AutoConfig with the attention implementation chosen and RoPE stretched to max_length when asked."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    config.use_cache = False
    if cfg.model.rope_scaling:
        base = getattr(config, "max_position_embeddings", cfg.data.max_length)
        factor = max(1.0, cfg.data.max_length / base)
        scaling = {"rope_type": cfg.model.rope_scaling, "factor": factor}
        if isinstance(getattr(config, "rope_parameters", None), dict):  # transformers >= 5 (keeps rope_theta)
            config.rope_parameters = {**config.rope_parameters, **scaling}
        else:
            config.rope_scaling = {**scaling, "type": cfg.model.rope_scaling}
        config.max_position_embeddings = max(base, cfg.data.max_length)
    return config


def pick_attn_implementation(requested: str) -> str:
    """auto -> flash_attention_2 (installed + CUDA), else sdpa; explicit values pass through."""
    import importlib.util

    import torch

    if requested != "auto":
        return requested
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def share_cpu_threads(environ: dict | None = None) -> int | None:
    """When the launcher left OMP_NUM_THREADS unset, share this host's cores among its ranks.

    torch starts one thread per core in every process, so 2 ranks on 2 cores would run 4 busy threads, and 8 GPU
    ranks each running CPU Adam on a 64-core host 512 (`deepspeed --num_gpus N` leaves it unset unless
    `--bind_cores_to_rank`; torchrun sets 1; Accelerate does the same as this).

    Returns:
        The threads per rank set, or None when OMP_NUM_THREADS decides.
    """
    import torch

    env = os.environ if environ is None else environ
    if env.get("OMP_NUM_THREADS"):
        return None
    local_ranks = int(env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or env.get("SLURM_NTASKS_PER_NODE") or 1)
    threads = max(1, len(os.sched_getaffinity(0)) // local_ranks)
    torch.set_num_threads(threads)
    return threads


def share_cpu_threads_if_needed(device_type: str, ds: dict, environ: dict | None = None) -> int | None:
    """`share_cpu_threads` whenever the CPU does the heavy work: training on CPU, or the optimizer offloaded to
    CPU (DeepSpeedCPUAdam runs on the host's threads, on any device). Returns what it set, or None."""
    if device_type == "cpu" or offloads_optimizer(ds):
        return share_cpu_threads(environ)
    return None


def pick_training_attention(requested: str, batching: str, sequence_parallel_size: int,
                            device_type: str | None = None) -> str:
    """`pick_attn_implementation`, then for SDPA on packed rows: on CUDA, flex_attention (transformers builds a
    document-causal block mask from position_ids and runs GQA without repeating KV heads: no [B, 1, T, T] mask,
    whose T^2 scores SDPA would compute in full); on CPU, or under sequence parallelism, `PACKED_SDPA` (each
    conversation its own causal SDPA, read from position_ids; see packed_attention)."""
    import torch

    from ds_vicuna.train.packed_attention import PACKED_SDPA, register_packed_sdpa

    attn = pick_attn_implementation(requested)
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if attn == "sdpa" and batching == "pack" and sequence_parallel_size == 1 and device_type == "cuda":
        return "flex_attention"
    if attn == "sdpa" and (batching == "pack" or sequence_parallel_size > 1):
        register_packed_sdpa()
        return PACKED_SDPA
    return attn


def enable_tf32(precision: str, device_type: str) -> bool:
    """fp32 training on CUDA: matmuls in TF32 (`torch.set_float32_matmul_precision("high")`), the precision whose
    peak `metrics.peak_flops("fp32")` divides by for MFU; without it fp32 MFU would be measured against a peak the
    GPU was never asked to reach. Returns whether TF32 was enabled."""
    import torch

    if precision != "fp32" or device_type != "cuda":
        return False
    torch.set_float32_matmul_precision("high")
    return True


def bf16_supported(device_type: str) -> bool:
    """Whether this GPU, or this CPU's torch (oneDNN), can train in bf16."""
    import torch

    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cpu_has_native_bf16() -> bool:
    """avx512_bf16 or AMX: bf16 matmuls run natively instead of being emulated through fp32."""
    import torch

    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def build_model(model_path: Path, model_config, tokenizer, cfg: Config, ds: dict, precision: str,
                attn_implementation: str | None = None, log=print):
    """Load the weights; under ZeRO-3 straight into partitions (HfDeepSpeedConfig must outlive from_pretrained).
    With `model.lora`, adapters are injected and the rest frozen (`ds_vicuna.train.lora`); with
    `model.quantization`, the frozen base is loaded in 4 bits first.

    Args:
        attn_implementation: overrides `pick_attn_implementation(cfg.model.attn_implementation)`.
        log: where LoRA's notices go (rank 0 prints; other ranks pass a no-op).

    Raises:
        ConfigError: a LoRA target or module to save that the model lacks, or QLoRA where it cannot run.
    """
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from ds_vicuna.train.lora import apply_lora, quantization_config

    dtype = torch_dtype(precision)
    keep_alive = HfDeepSpeedConfig(ds) if ds["zero_optimization"].get("stage") == 3 else None  # noqa: F841
    extra = {}
    if cfg.model.quantization is not None:
        try:
            extra["quantization_config"] = quantization_config(cfg.model.quantization)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        extra["dtype"] = torch_dtype(cfg.model.quantization.compute_dtype)
    model = AutoModelForCausalLM.from_pretrained(model_path, config=model_config, **{"dtype": dtype, **extra},
                                                 attn_implementation=attn_implementation or pick_attn_implementation(
                                                     cfg.model.attn_implementation))
    embeddings = model.get_input_embeddings().weight
    rows = embeddings.ds_shape[0] if hasattr(embeddings, "ds_shape") else embeddings.shape[0]  # ZeRO-3: partitioned
    vocab_grew = len(tokenizer) > rows
    if vocab_grew:  # template tokens were added
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=64)
    if cfg.model.lora is not None:
        try:
            apply_lora(model, cfg.model.lora, vocab_grew=vocab_grew, log=log)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    if cfg.model.gradient_checkpointing:  # non-reentrant: works with ZeRO-3 partitioned params and frozen inputs
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


def param_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (embeddings, projections), none on vectors (norms, biases).

    Under ZeRO-3 a parameter's own shape is an empty placeholder; its real shape is `ds_shape`.
    """
    def is_matrix(param) -> bool:
        return len(getattr(param, "ds_shape", param.shape)) >= 2

    trainable = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in trainable if is_matrix(p)], "weight_decay": weight_decay},
            {"params": [p for p in trainable if not is_matrix(p)], "weight_decay": 0.0}]


def build_engine(model, ds: dict, cfg: Config, total_steps: int, mpu=None):
    """AdamW (DeepSpeedCPUAdam when offloading), the LR schedule, and `deepspeed.initialize`.

    Args:
        mpu: DeepSpeed's sequence-parallel groups (`sequence_parallel.register_ulysses`), or None.
    """
    import deepspeed
    import torch
    from transformers import get_scheduler

    groups = param_groups(model, cfg.train.weight_decay)
    betas = (cfg.train.adam_beta1, cfg.train.adam_beta2)
    if offloads_optimizer(ds):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(groups, lr=cfg.train.learning_rate, betas=betas, adamw_mode=True)
    else:
        optimizer = torch.optim.AdamW(groups, lr=cfg.train.learning_rate, betas=betas)
    warmup = math.ceil(cfg.train.warmup_ratio * total_steps)

    def scheduler(opt):
        return get_scheduler(cfg.train.lr_scheduler, opt, num_warmup_steps=warmup, num_training_steps=total_steps)

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds,
                                           dist_init_required=False, mpu=mpu)
    engine.train()  # from_pretrained returns the model in eval mode: dropout would stay off
    return engine
