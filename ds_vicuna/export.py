"""Checkpoint -> a plain Hugging Face model folder that serve/, eval/ and `transformers` load as is.

    ds-vicuna export runs/vicuna_7b/step-000600 out/vicuna-7b            # 16-bit on GPU-trained runs
    ds-vicuna export runs/demo/train out/demo --dtype fp32                # an output dir means its `latest`

The weights are gathered from the ZeRO partitions by DeepSpeed's own `get_fp32_state_dict_from_zero_checkpoint`
(what `zero_to_fp32.py` runs), never from `model.state_dict()` on a ZeRO-3 rank, which holds empty placeholders.
OUT gets `model.safetensors`, `config.json`, the tokenizer with `chat_template` = the training template's Jinja
(so `tokenizer.apply_chat_template` reproduces the training prompt), `generation_config.json` whose
`eos_token_id` lists the template's stop tokens, and `ds_vicuna.json` (template, stops, max_length, base model).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ds_vicuna.checkpoint import HF_SUBDIR, CheckpointError, find_resume_path, is_complete

TRAIN_CONFIG_FILE = "ds_vicuna_train_config.json"
DTYPES = ("auto", "bf16", "fp16", "fp32")


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A complete `step-*` folder, or the newest complete one inside a training output dir.

    Raises:
        CheckpointError: nothing complete there.
    """
    path = Path(path)
    if is_complete(path):
        return path
    found = find_resume_path(path) if path.is_dir() else None
    if found is None:
        raise CheckpointError(f"{path}: not a complete checkpoint folder nor an output dir holding one")
    return found


def consolidated_state_dict(folder: Path) -> dict:
    """Full fp32 weights of a checkpoint, gathered from every rank's ZeRO shards by DeepSpeed's utility."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if any(folder.glob("*zero_pp_rank_*_optim_states.pt")):  # ZeRO stages 1-3 shard the fp32 master weights
        return get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    states = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return {k: v.float() for k, v in states["module"].items()}  # ZeRO stage 0: the module is saved whole


def read_training_record(folder: Path) -> dict:
    """The `{"config", "precision", "step"}` the trainer wrote beside the weights."""
    path = folder / HF_SUBDIR / TRAIN_CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {HF_SUBDIR}/{TRAIN_CONFIG_FILE}; not a ds-vicuna checkpoint")
    return json.loads(path.read_text())


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, dtype: str = "auto") -> Path:
    """Write a consolidated Hugging Face model folder.

    Args:
        checkpoint: a `step-*` folder or a training output dir (its newest complete checkpoint).
        out: destination folder (created).
        dtype: auto (the training precision: 16-bit on GPU runs, fp32 on CPU runs), bf16, fp16 or fp32.

    Returns:
        The output folder.

    Raises:
        CheckpointError: no complete checkpoint, or weights that do not fit the saved model config.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ds_vicuna.model_meta import write_model_meta
    from ds_vicuna.templates import get_template

    folder = resolve_checkpoint(checkpoint)
    record = read_training_record(folder)
    precision = record.get("precision", "fp32") if dtype == "auto" else dtype
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
    hf = folder / HF_SUBDIR
    config = AutoConfig.from_pretrained(hf)
    config.use_cache = True  # training turned the KV cache off; generation wants it
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = consolidated_state_dict(folder)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if getattr(config, "tie_word_embeddings", False) and k.endswith("lm_head.weight")}
    if set(missing) - tied or unexpected:
        raise CheckpointError(f"{folder}: weights do not match {hf}/config.json (missing {sorted(set(missing) - tied)}, "
                              f"unexpected {sorted(unexpected)})")
    model.tie_weights()
    out = Path(out)
    model.to(torch_dtype).save_pretrained(out, safe_serialization=True)

    template = get_template(record["config"]["model"]["template"])
    tokenizer = AutoTokenizer.from_pretrained(hf)
    tokenizer.chat_template = template.jinja(tokenizer)
    tokenizer.save_pretrained(out)
    stops = template.stop_strings(tokenizer)
    write_generation_config(out, config, tokenizer, stops)
    write_model_meta(out, template.name, stops, max_length=record["config"]["data"]["max_length"],
                     base_model=record["config"]["model"]["name_or_path"], step=record.get("step"),
                     dtype=precision)
    return out


def write_generation_config(out: Path, config, tokenizer, stops: list[str]) -> None:
    """generation_config.json: eos_token_id = the ids of the template's stop tokens (generation halts there)."""
    from transformers import GenerationConfig

    vocab = tokenizer.get_vocab()
    stop_ids = [vocab[s] for s in stops if s in vocab]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in stop_ids:
        stop_ids.append(tokenizer.eos_token_id)
    generation = GenerationConfig.from_model_config(config)
    generation.eos_token_id = stop_ids[0] if len(stop_ids) == 1 else stop_ids
    generation.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    generation.bos_token_id = tokenizer.bos_token_id
    generation.save_pretrained(out)


def register(subparsers) -> None:
    """`ds-vicuna export CKPT OUT [--dtype ...]`."""
    parser = subparsers.add_parser("export", help="checkpoint -> Hugging Face model folder (safetensors)",
                                   description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a step-* folder or a training output dir (uses its newest checkpoint)")
    parser.add_argument("out", help="destination folder")
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="weights dtype; auto = the training precision (16-bit on GPU, fp32 on CPU)")
    parser.set_defaults(func=_run_export)


def _run_export(args) -> int:
    import sys

    try:
        out = export_checkpoint(args.checkpoint, args.out, args.dtype)
    except CheckpointError as err:
        print(f"ds-vicuna export: error: {err}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} -> {out}")
    return 0
