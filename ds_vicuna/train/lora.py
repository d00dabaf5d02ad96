"""LoRA (and QLoRA) for the trainer: adapters injected into the loaded model with peft, everything else frozen.

    model = build_model(...)                                  # ds_vicuna.train.build (partitioned under ZeRO-3)
    saved = apply_lora(model, cfg.model.lora, vocab_grew=True)  # -> ["embed_tokens", "lm_head"]
    trainable, total = count_parameters(model)

`peft.inject_adapter_in_model` replaces each targeted `nn.Linear` in place by peft's LoRA layer (its frozen
`base_layer` plus `lora_A`/`lora_B`), so the module stays the Hugging Face model the loop, the chunked loss,
packing and sequence parallelism already know; its parameter names gain `.base_layer.` and `.lora_A.default.`.
The adapters are created as ordinary tensors (identical on every rank: the trainer seeded torch first) and
`deepspeed.initialize` partitions them under ZeRO-3 like any parameter it finds unpartitioned.

`modules_to_save` (whole modules trained beside the adapters, e.g. the embedding rows of added template tokens)
are trained in place (`requires_grad`), not copied as peft's `ModulesToSaveWrapper` would: a copy of a
ZeRO-3-partitioned module is not a partitioned module. Export writes them under peft's names, so
`PeftModel.from_pretrained` restores them (ds_vicuna.train.export).

The checkpoint holds the trainable tensors and their optimizer state only (`engine.save_checkpoint(...,
exclude_frozen_parameters=True)`): the frozen base is read again from `model.name_or_path` on resume.
"""
from __future__ import annotations

from ds_vicuna.config import LoraConfig, QuantizationConfig

ADAPTER_NAME = "default"  # peft's name for a model's only adapter
VOCAB_MODULES = ("embed_tokens", "lm_head")  # trained whole when template tokens were added to the vocabulary


def peft_lora_config(lora: LoraConfig, modules_to_save: list[str] | None = None, base_model: str | None = None):
    """The `peft.LoraConfig` of our `model.lora` section (what training injects and export writes)."""
    import peft

    targets = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
    return peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                           modules_to_save=list(modules_to_save) or None if modules_to_save else None,
                           bias="none", task_type="CAUSAL_LM", base_model_name_or_path=base_model)


def modules_to_save_for(lora: LoraConfig, vocab_grew: bool) -> list[str]:
    """The configured modules_to_save, plus embed_tokens and lm_head when template tokens grew the vocabulary."""
    saved = list(lora.modules_to_save or [])
    if vocab_grew:
        saved += [m for m in VOCAB_MODULES if m not in saved]
    return saved


def apply_lora(model, lora: LoraConfig, vocab_grew: bool = False, log=print) -> list[str]:
    """Inject LoRA adapters into `model` in place; freeze all but the adapters and `modules_to_save`.

    Args:
        model: a Hugging Face causal LM (under ZeRO-3 its parameters are already partitioned).
        lora: the `model.lora` section.
        vocab_grew: template tokens were added (the embeddings were resized): their rows must train.
        log: where the notice about added modules_to_save goes (rank 0's print; a no-op elsewhere).

    Returns:
        The modules trained whole (short names, e.g. ["embed_tokens", "lm_head"]).

    Raises:
        ValueError: a target or module to save that the model does not have, naming it.
    """
    import peft

    saved = modules_to_save_for(lora, vocab_grew)
    added = [m for m in saved if m not in (lora.modules_to_save or [])]
    if added:
        log(f"[ds-vicuna] LoRA: template tokens were added to the vocabulary, so {' and '.join(added)} train whole "
            "(added to model.lora.modules_to_save)")
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in saved if m not in names]
    if missing:
        raise ValueError(f"model.lora.modules_to_save: the model has no module named {', '.join(missing)}")
    if not isinstance(lora.target_modules, str):
        missing = [m for m in lora.target_modules if m not in names]
        if missing:
            raise ValueError(f"model.lora.target_modules: the model has no module named {', '.join(missing)}")
    for param in model.parameters():
        param.requires_grad_(False)
    peft.inject_adapter_in_model(peft_lora_config(lora), model, adapter_name=ADAPTER_NAME)
    for name, param in model.named_parameters():
        parts = name.split(".")
        param.requires_grad_(".lora_" in name or any(m in parts for m in saved))
    return saved


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameters; under ZeRO-3 each partitioned parameter counts its full size."""
    def numel(p):
        return getattr(p, "ds_numel", p.numel())

    params = list(model.parameters())
    return sum(numel(p) for p in params if p.requires_grad), sum(numel(p) for p in params)


def is_lora_run(record_config: dict) -> bool:
    """Whether the resolved config saved in a checkpoint trained LoRA adapters."""
    return bool((record_config.get("model") or {}).get("lora") is not None)


def peft_key(name: str, modules_to_save: list[str]) -> str | None:
    """Our trained parameter's name -> its key in peft's `adapter_model.safetensors` (None: not saved there).

    `model.layers.0.self_attn.q_proj.lora_A.default.weight` -> `base_model.model.model.layers.0.self_attn.q_proj.
    lora_A.weight`; a module trained whole, `model.embed_tokens.weight` -> `base_model.model.model.embed_tokens.weight`
    (peft strips the adapter name and `modules_to_save.` when saving and puts them back when loading).
    """
    parts = name.split(".")
    if ".lora_A." in name or ".lora_B." in name:
        return "base_model.model." + name.replace(f".{ADAPTER_NAME}.", ".")
    if any(m in parts for m in modules_to_save):
        return "base_model.model." + name
    return None


def quantization_config(quant: QuantizationConfig):
    """transformers' `BitsAndBytesConfig` for `model.quantization` (4-bit, packed weights stored in the compute
    dtype so ZeRO-3 can partition them).

    Raises:
        ValueError: bitsandbytes is not installed, or too old for 4-bit on the CPU, saying what to do.
    """
    import importlib.util

    import torch
    from transformers import BitsAndBytesConfig

    from ds_vicuna.model.loading import torch_dtype

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("model.quantization needs bitsandbytes: pip install 'ds-vicuna[qlora]' (or bitsandbytes "
                         ">= 0.46: 4-bit kernels for CUDA and the CPU)")
    from importlib.metadata import version

    from packaging.version import Version

    if not torch.cuda.is_available() and Version(version("bitsandbytes")) < Version("0.46"):
        raise ValueError(f"model.quantization on the CPU needs bitsandbytes >= 0.46 (installed: "
                         f"{version('bitsandbytes')}, 4-bit kernels for CUDA only): pip install -U bitsandbytes")
    compute = torch_dtype(quant.compute_dtype)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant.type,
                              bnb_4bit_use_double_quant=quant.double_quant, bnb_4bit_compute_dtype=compute,
                              bnb_4bit_quant_storage=compute)
