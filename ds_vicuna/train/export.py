"""Checkpoint -> a plain Hugging Face model folder that serve/, eval/ and `transformers` load as is.

    ds-vicuna export runs/vicuna_13b/step-000600 out/vicuna-13b          # the training precision (bf16 on GPU)
    ds-vicuna export runs/demo/train out/demo --dtype fp32                # an output dir means its `latest`
    ds-vicuna export runs/vicuna_13b out/vicuna-13b --max-shard-size 2GB  # smaller shards, less memory

Bounded memory: the weights are read through DeepSpeed's own `get_fp32_state_dict_from_zero_checkpoint(...,
lazy_mode=True)`, which memory-maps every rank's ZeRO partition file (the Adam moments in it are never read) and
gathers a parameter only when asked. Export asks for one safetensors shard at a time, casts it, writes it, frees it
and drops the mapped pages it read, so peak RSS follows `--max-shard-size`, not the model size (BENCHMARKS.md).
Never `model.state_dict()` on a ZeRO-3 rank, which holds empty placeholders.

OUT gets Hugging Face's sharded layout (`model.safetensors`, or `model-00001-of-0000N.safetensors` ... with
`model.safetensors.index.json`), `config.json` (its `dtype` the export's), the tokenizer with `chat_template` = the
training template's Jinja (so `tokenizer.apply_chat_template` reproduces the training prompt),
`generation_config.json` whose `eos_token_id` lists the template's stop tokens, and `ds_vicuna.json` (template,
stops, max_length, base model). ZeRO-1/2 checkpoints are gathered whole by DeepSpeed (its zero_to_fp32 concatenates
their flat partitions), so only ZeRO-3 (the default) and stage-0 checkpoints export in bounded memory.

A LoRA run (`model.lora`) exports as a peft adapter folder that `PeftModel.from_pretrained(base, OUT)` loads, or
with `--merge` as one plain model, base + adapter, merged by peft (`export_lora`):

    ds-vicuna export runs/lora OUT             # adapter_config.json + adapter_model.safetensors + tokenizer + card
    ds-vicuna export --merge runs/lora OUT     # config.json + model.safetensors: logits of base + adapter
"""
from __future__ import annotations

import dataclasses
import json
import mmap
import os
import re
import time
from pathlib import Path

from ds_vicuna.model.loading import DTYPE_CHOICES, torch_dtype
from ds_vicuna.train.checkpoint import (HF_SUBDIR, TRAIN_CONFIG_FILE, CheckpointError, find_resume_path, is_complete,
                                  read_training_record)
from ds_vicuna.train.lora import is_lora_run

__all__ = ["TRAIN_CONFIG_FILE", "resolve_checkpoint", "lazy_state_dict", "consolidated_state_dict",
           "read_training_record", "export_checkpoint"]
DEFAULT_MAX_SHARD_SIZE = "5GB"
WEIGHTS_PATTERN = "model{suffix}.safetensors"
INDEX_FILE = "model.safetensors.index.json"


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


def lazy_state_dict(folder: Path) -> tuple[dict, list]:
    """The checkpoint's weights without reading them: name -> a tensor or DeepSpeed's lazy `GatheredTensor`
    (`.contiguous()` gathers it), plus the memory-mapped tensors they are read from (see `drop_mapped_pages`)."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if any(folder.glob("*zero_pp_rank_*_optim_states.pt")):  # ZeRO stages 1-3 shard the fp32 master weights
        state = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name, lazy_mode=True)
        mapped = {id(t): t for value in state.values() for rank in getattr(value, "flat_groups", ())
                  for t in rank}
        return state, list(mapped.values())
    # ZeRO stage 0: the module is saved whole, in the training precision
    module = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", mmap=True,
                        weights_only=False)["module"]
    return dict(module), list(module.values())


def consolidated_state_dict(folder: Path) -> dict:
    """Full fp32 weights of a checkpoint, all in memory (tests compare them; export streams instead)."""
    state, _ = lazy_state_dict(folder)
    return {name: _materialize(value, None) for name, value in state.items()}


def _materialize(value, dtype):
    """Gather one (lazy) tensor into memory, cast to `dtype` when it is floating point (None: fp32)."""
    import torch

    tensor = value.contiguous()
    if tensor.is_floating_point():
        tensor = tensor.to(dtype or torch.float32)
    return tensor.clone() if tensor.data_ptr() == getattr(value, "data_ptr", lambda: None)() else tensor  # not the map


def drop_mapped_pages(tensors: list) -> None:
    """Unmap the pages of memory-mapped (read-only, file-backed) tensors that were read so far: the kernel refetches
    them from the file if they are read again. Tensors in ordinary memory are left alone (Linux only)."""
    import ctypes

    if not hasattr(mmap, "MADV_DONTNEED") or not os.path.exists("/proc/self/maps"):
        return
    files = _file_mappings()
    libc = ctypes.CDLL(None, use_errno=True)
    page = mmap.PAGESIZE
    for tensor in tensors:
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        if not any(lo <= start and end <= hi for lo, hi in files):  # anonymous memory: MADV_DONTNEED would zero it
            continue
        first, last = -(-start // page) * page, end // page * page
        if last > first:
            libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), mmap.MADV_DONTNEED)


def _file_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process that map a file (from /proc/self/maps: inode != 0, a path)."""
    ranges = []
    with open("/proc/self/maps") as fh:
        for line in fh:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[4] != "0" and fields[5].startswith("/"):
                lo, hi = fields[0].split("-")
                ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


def expected_weights(config) -> tuple[dict, set]:
    """The model class's saved tensors: name -> (shape, dtype or None for floating point), and the names of tied
    duplicates Hugging Face leaves out (e.g. lm_head.weight when it is the input embedding)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()
    all_params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    kept = {name for name, _ in model.named_parameters()}
    tied = all_params - kept
    expected = {name: (tuple(t.shape), None if t.is_floating_point() else t.dtype)
                for name, t in model.state_dict().items() if name not in tied}
    return expected, tied


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, dtype: str = "auto",
                      max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE, progress: bool = True,
                      merge: bool = False) -> Path:
    """Write a consolidated Hugging Face model folder, one safetensors shard in memory at a time; for a LoRA run
    a peft adapter folder, or with `merge` the base with the adapters merged in (`export_lora`).

    Args:
        checkpoint: a `step-*` folder or a training output dir (its newest complete checkpoint).
        out: destination folder (created; weight files of an earlier export there are replaced).
        dtype: auto (the training precision: bf16/fp16 on GPU runs, fp32 on CPU runs), bf16, fp16 or fp32.
        max_shard_size: largest shard ("5GB", "500MB" or bytes); also bounds the export's memory.
        progress: show a progress bar over the shards.
        merge: (LoRA runs) write base + adapters as one plain model instead of the adapter folder.

    Returns:
        The output folder.

    Raises:
        CheckpointError: no complete checkpoint, or weights that do not fit the saved model config.
        ValueError: an unreadable max_shard_size.
    """
    import torch
    from huggingface_hub import split_torch_state_dict_into_shards
    from transformers import AutoConfig

    folder = resolve_checkpoint(checkpoint)
    record = read_training_record(folder)
    precision = record.get("precision", "fp32") if dtype == "auto" else dtype
    weights_dtype = torch_dtype(precision)
    if is_lora_run(record["config"]):
        return export_lora(folder, record, out, precision, merge=merge, max_shard_size=max_shard_size)
    if merge:
        raise CheckpointError(f"{folder}: --merge is for LoRA runs (model.lora); this run trained every weight, "
                              "export it without --merge")
    hf = folder / HF_SUBDIR
    config = AutoConfig.from_pretrained(hf)
    config.use_cache = True  # training turned the KV cache off; generation wants it
    expected, tied = expected_weights(config)
    state, mapped = lazy_state_dict(folder)
    check_weights(folder, hf, state, expected, tied)

    plan = split_torch_state_dict_into_shards(
        {name: torch.empty(shape, dtype=kind or weights_dtype, device="meta")
         for name, (shape, kind) in expected.items()},
        filename_pattern=WEIGHTS_PATTERN, max_shard_size=max_shard_size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("model*.safetensors"), out / INDEX_FILE]:
        stale.unlink(missing_ok=True)
    write_shards(out, plan.filename_to_tensors, state, mapped, weights_dtype, progress)
    if plan.is_sharded:
        index = {"metadata": plan.metadata, "weight_map": plan.tensor_to_filename}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    config.dtype = weights_dtype
    config.save_pretrained(out)
    write_tokenizer_and_card(out, hf, record, precision, config)
    return out


def write_tokenizer_and_card(out: Path, hf: Path, record: dict, precision: str, config=None, **card) -> list[str]:
    """The tokenizer (chat_template = the training template's Jinja), generation_config.json (when `config` is
    given: a model folder) and the model card `ds_vicuna.json`. Returns the template's stop strings."""
    from transformers import AutoTokenizer

    from ds_vicuna.chat.templates import get_template
    from ds_vicuna.model.card import write_model_meta

    template = get_template(record["config"]["model"]["template"])
    tokenizer = AutoTokenizer.from_pretrained(hf)
    tokenizer.chat_template = template.jinja(tokenizer)
    tokenizer.save_pretrained(out)
    stops = template.stop_strings(tokenizer)
    if config is not None:
        write_generation_config(out, config, tokenizer, stops)
    write_model_meta(out, template.name, stops, max_length=record["config"]["data"]["max_length"],
                     base_model=record["config"]["model"]["name_or_path"], step=record.get("step"),
                     dtype=precision, **card)
    return stops


def export_lora(folder: Path, record: dict, out: str | os.PathLike, precision: str, merge: bool = False,
                max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """A LoRA run's checkpoint -> a peft adapter folder, or (`merge`) a plain model with the adapters merged in.

    The adapter folder holds what `PeftModel.from_pretrained(base, OUT)` reads (`adapter_config.json`,
    `adapter_model.safetensors` under peft's key names), the tokenizer, `ds_vicuna.json` (template, stops,
    `base_model`, `adapter: true`) and a README naming the base. When template tokens were added in training, the
    embedding and output rows are in it (modules_to_save): resize the base's embeddings to
    `adapter_vocab_size` (the card says it) before loading. The merged model is built by peft itself:
    `PeftModel.from_pretrained(base, adapter).merge_and_unload()`, in fp32, then cast to `precision`.

    Raises:
        CheckpointError: the checkpoint holds no adapter tensors, or the base model is missing.
    """
    import tempfile

    import torch
    from safetensors.torch import save_file

    from ds_vicuna.config import LoraConfig
    from ds_vicuna.model.embedded import resolve_model_path
    from ds_vicuna.train.lora import peft_key, peft_lora_config

    out = Path(out)
    hf = folder / HF_SUBDIR
    state = consolidated_state_dict(folder)  # the adapters (and modules_to_save): small, all in memory
    lora_names = [n for n in state if ".lora_A." in n or ".lora_B." in n]
    if not lora_names:
        raise CheckpointError(f"{folder}: the run's config has model.lora but the checkpoint holds no lora_A/lora_B "
                              f"tensors (it has {sorted(state)[:5]}...)")
    saved_modules = sorted({_module_of(n) for n in state if n not in lora_names})
    try:
        base = resolve_model_path(record["config"]["model"]["name_or_path"])
    except FileNotFoundError as err:
        raise CheckpointError(f"{folder}: the base model of this LoRA run is missing: {err}") from None
    lora = LoraConfig(**record["config"]["model"]["lora"])
    # the modules the adapters sit on, by name (what `all-linear` resolved to on this base)
    targets = sorted({n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora_names})
    config = peft_lora_config(dataclasses.replace(lora, target_modules=targets), saved_modules, base_model=str(base))
    dtype = torch_dtype(precision)
    tensors = {peft_key(n, saved_modules): t.to(dtype if not merge else torch.float32).contiguous()
               for n, t in state.items()}
    vocab = int(tensors[next(k for k in tensors if k.endswith("embed_tokens.weight"))].shape[0]) \
        if "embed_tokens" in saved_modules else None
    card = {"adapter": True, "adapter_vocab_size": vocab} if vocab else {"adapter": True}
    if not merge:
        out.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(out)
        save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        write_tokenizer_and_card(out, hf, record, precision, **card)
        (out / "README.md").write_text(_adapter_readme(record, base, lora, saved_modules, vocab))
        return out
    with tempfile.TemporaryDirectory(prefix="ds-vicuna-adapter-") as tmp:
        config.save_pretrained(tmp)
        save_file(tensors, str(Path(tmp) / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        merged = merge_adapter(base, tmp, vocab)
    merged = merged.to(dtype)
    merged.config.use_cache = True
    merged.config.dtype = dtype
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("model*.safetensors"), out / INDEX_FILE]:
        stale.unlink(missing_ok=True)
    merged.save_pretrained(out, max_shard_size=max_shard_size)
    write_tokenizer_and_card(out, hf, record, precision, merged.config)
    return out


ADAPTER_WEIGHTS = "adapter_model.safetensors"


def merge_adapter(base: str | os.PathLike, adapter: str | os.PathLike, vocab_size: int | None = None):
    """`PeftModel.from_pretrained(base, adapter).merge_and_unload()` in fp32: base + (alpha/r) B @ A per layer.

    Args:
        vocab_size: resize the base's embeddings to this first (an adapter that trained added template tokens).
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if vocab_size is not None and vocab_size != model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(vocab_size)
    return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()


def _module_of(name: str) -> str:
    """`model.embed_tokens.weight` -> `embed_tokens` (the module a parameter trained whole belongs to)."""
    return name.rsplit(".", 2)[-2]


def _adapter_readme(record: dict, base: Path, lora, saved_modules: list[str], vocab: int | None) -> str:
    name = record["config"]["model"]["name_or_path"]
    resize = (f"base.resize_token_embeddings({vocab})  # template tokens were added in training\n"
              if vocab else "")
    return (f"---\nbase_model: {name}\nlibrary_name: peft\n---\n\n# LoRA adapter (ds-vicuna)\n\n"
            f"Trained by ds-vicuna on top of `{name}` (loaded from `{base}`) for {record.get('step')} steps: "
            f"rank {lora.r}, alpha {lora.alpha}, targets `{lora.target_modules}`"
            + (f", trained whole: {', '.join(saved_modules)}" if saved_modules else "") + f", chat template "
            f"`{record['config']['model']['template']}`.\n\n```python\nfrom peft import PeftModel\n"
            f"from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f"base = AutoModelForCausalLM.from_pretrained(\"{base}\")\n{resize}"
            f"model = PeftModel.from_pretrained(base, \"THIS_FOLDER\")\n"
            f"tokenizer = AutoTokenizer.from_pretrained(\"THIS_FOLDER\")\n```\n\n"
            "Serve it beside other adapters over one base: `ds-vicuna serve all --model BASE --adapter "
            "NAME=THIS_FOLDER`; or merge it: `ds-vicuna export --merge CHECKPOINT OUT`.\n")


def check_weights(folder: Path, hf: Path, state: dict, expected: dict, tied: set) -> None:
    """Every tensor the model class saves is in the checkpoint with its shape, and nothing else is.

    Raises:
        CheckpointError: naming the missing, unexpected or misshapen tensors.
    """
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected) - tied)
    shapes = sorted(f"{name} {tuple(state[name].shape)} vs {shape}" for name, (shape, _) in expected.items()
                    if name in state and tuple(state[name].shape) != shape)
    if missing or unexpected or shapes:
        raise CheckpointError(f"{folder}: weights do not match {hf}/config.json (missing {missing}, unexpected "
                              f"{unexpected}, other shapes {shapes})")


def honour_umask(path: Path) -> None:
    """Give a file the mode a plain `open()` would (0666 less the umask): safetensors writes 0600 whatever the
    umask, which would keep the exported weights from the group that serves them."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def write_shards(out: Path, shards: dict[str, list[str]], state: dict, mapped: list, dtype, progress: bool) -> None:
    """Gather, cast and write each shard in turn; only one shard's tensors are alive at a time."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    started, written = time.perf_counter(), 0
    bar = tqdm(shards.items(), desc="export shards", unit="shard", disable=not progress)
    for filename, names in bar:
        tensors = {name: _materialize(state[name], dtype) for name in names}
        save_file(tensors, str(out / filename), metadata={"format": "pt"})
        honour_umask(out / filename)
        written += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
        drop_mapped_pages(mapped)
        bar.set_postfix(GB=f"{written / 1e9:.2f}", MB_s=f"{written / 1e6 / (time.perf_counter() - started):.0f}")


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
    """`ds-vicuna export CKPT OUT [--dtype ...] [--max-shard-size ...] [--merge]`."""
    parser = subparsers.add_parser("export", help="checkpoint -> Hugging Face model folder (sharded safetensors)",
                                   description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a step-* folder or a training output dir (uses its newest checkpoint)")
    parser.add_argument("out", help="destination folder")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                        help="weights dtype; auto = the training precision (bf16/fp16 on GPU, fp32 on CPU)")
    parser.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE,
                        help=f"largest safetensors shard, e.g. 2GB or 500MB (default {DEFAULT_MAX_SHARD_SIZE}); "
                             "export holds about one shard in memory")
    parser.add_argument("--merge", action="store_true",
                        help="LoRA runs: write base + adapters merged into one plain model (default: the peft "
                             "adapter folder)")
    parser.set_defaults(func=_run_export)


def _run_export(args) -> int:
    import sys

    try:
        max_shard_size = parse_size(args.max_shard_size)
    except ValueError as err:
        print(f"ds-vicuna export: error: --max-shard-size: {err}", file=sys.stderr)
        return 2
    try:
        out = export_checkpoint(args.checkpoint, args.out, args.dtype, max_shard_size, merge=args.merge)
    except CheckpointError as err:
        print(f"ds-vicuna export: error: {err}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} -> {out}")
    return 0


def parse_size(text: str) -> int:
    """"5GB" -> 5_000_000_000, "500MB", "123" (bytes): Hugging Face's decimal units for --max-shard-size.

    Raises:
        ValueError: not a number with one of B, KB, MB, GB, TB.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B)?\s*", text, flags=re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"expected a size like 5GB, 500MB or a byte count, got {text!r}")
    return int(float(match.group(1)) * 1000 ** "BKMGT".index((match.group(2) or "B")[0].upper()))
