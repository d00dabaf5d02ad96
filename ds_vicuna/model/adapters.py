"""LoRA adapter folders (peft's layout) read and checked against the base model they will run on.

    adapter = load_adapter("support", "out/support-lora", base_model)   # Adapter(name, r, scaling, weights...)
    adapter.weights["model.layers.0.self_attn.q_proj"]                 # (A [r, in], B [out, r])

An adapter folder is what `ds-vicuna export` writes for a LoRA run and what peft's `save_pretrained` writes:
`adapter_config.json` (peft_type LORA, r, lora_alpha, use_rslora) and `adapter_model.safetensors` with keys
`base_model.model.<module>.lora_A.weight` / `.lora_B.weight`. A folder that cannot run on the base is refused
before anything is served, the message naming the file and what does not match: a missing file, a rank that
differs from the config's `r`, a module the base lacks or whose shape differs (an adapter trained on another
base), or features the multi-adapter server does not apply per row (modules_to_save, DoRA, trained biases).
The serving worker applies many adapters per batch (`ds_vicuna.serve.multi_lora`); `eval answer` merges one
(`merge_into`).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."


class AdapterError(ValueError):
    """An adapter folder that cannot run on this base: the message names the file and the mismatch."""


@dataclass
class Adapter:
    """One LoRA adapter, checked against its base.

    Attributes:
        name: the model name clients use for it.
        path: its folder.
        r: its rank.
        scaling: lora_alpha / r (lora_alpha / sqrt(r) with rsLoRA): the adapter adds scaling * B @ A.
        weights: base module name -> (A [r, in_features], B [out_features, r]).
        card: the folder's `ds_vicuna.json` (template, stops) as a dict; {} when it has none.
    """

    name: str
    path: Path
    r: int
    scaling: float
    weights: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    card: dict = field(default_factory=dict)


def parse_adapter_arg(text: str) -> tuple[str, str]:
    """`NAME=PATH` (the `--adapter` flag) -> (name, path).

    Raises:
        AdapterError: no `=`, or an empty name or path.
    """
    name, sep, path = text.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise AdapterError(f"--adapter {text!r}: expected NAME=PATH (e.g. support=out/support-lora)")
    return name.strip(), path.strip()


def load_adapter(name: str, path: str | Path, base_model) -> Adapter:
    """Read a peft LoRA folder and check every tensor against `base_model` (a Hugging Face causal LM).

    Raises:
        AdapterError: a missing file, an unreadable config, a rank or shape mismatch, a module the base lacks, or
            a feature that cannot be served per row; naming the file and the mismatch.
    """
    from safetensors import SafetensorError, safe_open

    folder = Path(path)
    config_file, weights_file = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    for needed in (config_file, weights_file):
        if not needed.is_file():
            raise AdapterError(f"adapter {name!r}: {needed} not found (an adapter folder holds {ADAPTER_CONFIG} and "
                               f"{ADAPTER_WEIGHTS}, as `ds-vicuna export` of a LoRA run writes them)")
    config = _read_config(config_file)
    r = config["r"]
    scaling = config["lora_alpha"] / (math.sqrt(r) if config.get("use_rslora") else r)
    modules = dict(base_model.named_modules())
    pairs: dict[str, dict[str, Any]] = {}
    try:
        with safe_open(str(weights_file), framework="pt") as fh:
            for key in fh.keys():
                module, part = _split_key(key, weights_file)
                pairs.setdefault(module, {})[part] = fh.get_tensor(key)
    except (SafetensorError, OSError) as err:
        raise AdapterError(f"{weights_file}: not a readable safetensors file ({err})") from None
    if not pairs:
        raise AdapterError(f"{weights_file}: holds no lora_A/lora_B tensors")
    weights = {}
    for module, parts in sorted(pairs.items()):
        weights[module] = _check_pair(module, parts, modules.get(module), r, weights_file, config_file)
    card_file = folder / "ds_vicuna.json"
    card = json.loads(card_file.read_text()) if card_file.is_file() else {}
    return Adapter(name, folder, r, float(scaling), weights, card)


def _read_config(config_file: Path) -> dict:
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise AdapterError(f"{config_file}: not valid JSON ({err})") from None
    if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{config_file}: peft_type {config.get('peft_type') if isinstance(config, dict) else None!r}"
                           "; only LoRA adapters can be served")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise AdapterError(f"{config_file}: field 'r' must be a positive integer, got {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
        raise AdapterError(f"{config_file}: field 'lora_alpha' must be a positive number, got {alpha!r}")
    unsupported = {"modules_to_save": config.get("modules_to_save"), "use_dora": config.get("use_dora"),
                   "rank_pattern": config.get("rank_pattern"), "alpha_pattern": config.get("alpha_pattern")}
    unsupported = {k: v for k, v in unsupported.items() if v}
    if config.get("bias", "none") != "none":
        unsupported["bias"] = config["bias"]
    if unsupported:
        raise AdapterError(f"{config_file}: {', '.join(f'{k}={v!r}' for k, v in unsupported.items())} cannot be "
                           "applied per request over a shared base; serve the merged model instead "
                           "(`ds-vicuna export --merge`)")
    return config


def _split_key(key: str, weights_file: Path) -> tuple[str, str]:
    """`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` -> (`model.layers.0.self_attn.q_proj`, A)."""
    for part in ("A", "B"):
        suffix = f".lora_{part}.weight"
        if key.startswith(_PREFIX) and key.endswith(suffix):
            return key[len(_PREFIX):-len(suffix)], part
    raise AdapterError(f"{weights_file}: unexpected tensor {key!r}; a LoRA adapter holds only "
                       f"{_PREFIX}<module>.lora_A.weight and .lora_B.weight")


def _check_pair(module: str, parts: dict, target, r: int, weights_file: Path, config_file: Path) -> tuple:
    """(A, B) of one module, checked against the config's rank and the base module's shape."""
    import torch

    missing = [p for p in ("A", "B") if p not in parts]
    if missing:
        raise AdapterError(f"{weights_file}: {module} has no lora_{missing[0]}.weight")
    a, b = parts["A"], parts["B"]
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        raise AdapterError(f"{weights_file}: {module}'s lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not "
                           "make a low-rank pair")
    if a.shape[0] != r:
        raise AdapterError(f"{weights_file}: {module}.lora_A has rank {a.shape[0]} but {config_file} says r={r} "
                           "(the weights and the config come from different adapters)")
    if not isinstance(target, torch.nn.Linear):
        what = "has no such module" if target is None else f"has a {type(target).__name__} there, not a Linear"
        raise AdapterError(f"{weights_file}: {module}: the base model {what} (an adapter trained on another base?)")
    if (a.shape[1], b.shape[0]) != (target.in_features, target.out_features):
        raise AdapterError(f"{weights_file}: {module} adapts a [{b.shape[0]} x {a.shape[1]}] layer but the base's is "
                           f"[{target.out_features} x {target.in_features}] (an adapter trained on another base)")
    return a, b


def adapter_chat_model(base, adapter: Adapter):
    """A `ChatModel` for `adapter` sharing `base`'s weights (a ChatModel), with the tokenizer, template and stop
    strings of the adapter's folder (its `ds_vicuna.json`; the base's template when it has none).

    Raises:
        AdapterError: the adapter's tokenizer has another vocabulary size than the base's, or a bad card.
    """
    from transformers import AutoTokenizer

    from ds_vicuna.model.card import read_model_card
    from ds_vicuna.model.loading import ChatModel

    has_tokenizer = (adapter.path / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(adapter.path) if has_tokenizer else base.tokenizer
    if len(tokenizer) != len(base.tokenizer):
        raise AdapterError(f"{adapter.path / 'tokenizer_config.json'}: the adapter's tokenizer has {len(tokenizer)} "
                           f"tokens, the base's {len(base.tokenizer)} (another base?)")
    try:
        card = read_model_card(adapter.path)
    except ValueError as err:
        raise AdapterError(str(err)) from None
    template = None if adapter.card else base.template  # a folder without a card speaks the base's template
    return ChatModel.build(base.model, tokenizer, template, adapter.name, card)


def merge_into(model, adapter: Adapter) -> None:
    """Add scaling * B @ A to each adapted Linear of `model` in place (one adapter, e.g. for `eval answer`)."""
    import torch

    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, (a, b) in adapter.weights.items():
            weight = modules[name].weight
            delta = (b.float() @ a.float()) * adapter.scaling  # [out, in]
            weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))
