"""Training configuration: three typed dataclasses, a YAML file, `--key value` overrides, checks before work starts.

    ds-vicuna train configs/demo.yaml --train.learning_rate 1e-4 --max_length 512
    python -m ds_vicuna.train configs/vicuna_7b.yaml data.train_path=data/train.jsonl

A key may be dotted (`train.learning_rate`) or bare when only one section has it (`learning_rate`).
Values are parsed as YAML (`1e-4`, `true`, `null`) and must match the field's type. The DeepSpeed engine
settings live in `ds_configs/*.json`; `fill_deepspeed_config` writes batch sizes, bucket sizes and precision
into that dict, because plain DeepSpeed does not resolve `"auto"` (only HF Trainer/Accelerate do).

Both folders are installed with the package (`ds_vicuna.ds_configs`, `ds_vicuna.configs`), so a bundled name
works in any install: `train.deepspeed: zero3` and `ds-vicuna train demo`. A relative input path written in a
config file (data files, the DeepSpeed file, the model folder, a resume folder) is read from the config file's
folder; outputs (`train.output_dir`, `data.cache_dir`) and every path given on the command line are relative to
the current folder.
"""
from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

from ds_vicuna.model.loading import DTYPE_CHOICES

ATTN_IMPLEMENTATIONS = ("auto", "flash_attention_2", "flex_attention", "sdpa", "eager")
ROPE_SCALING = ("linear", "dynamic")
BATCHING = ("pack", "group", "max")
MASKS = ("assistant", "last_turn", "all")
SCHEDULERS = ("cosine", "linear", "constant")
PRECISIONS = DTYPE_CHOICES  # the same choices and auto policy as inference (ds_vicuna.model.loading)
DEFAULT_LOSS_CHUNK_TOKENS = 1024
DEEPSPEED_PACKAGE = "ds_vicuna.ds_configs"  # the repository's ds_configs/, installed as package data
EXAMPLES_PACKAGE = "ds_vicuna.configs"  # the repository's configs/
# Every linear projection of attention and MLP (peft's "all-linear": each nn.Linear but the output layer).
DEFAULT_LORA_TARGETS = "all-linear"
QUANT_TYPES = ("nf4", "fp4")
QUANT_COMPUTE_DTYPES = ("bf16", "fp16", "fp32")


class ConfigError(ValueError):
    """A configuration that cannot run: the message names the field or file and what to change."""


@dataclass
class LoraConfig:
    """`model.lora`: train low-rank adapters (peft's LoRA) on a frozen base instead of every weight."""

    r: int = 16
    """Rank of each adapter: A is [r, in_features], B is [out_features, r]."""
    alpha: float = 32.0
    """Scale: the adapter adds (alpha / r) * B @ A to the frozen weight."""
    dropout: float = 0.05
    """Dropout on the adapter's input (training only)."""
    target_modules: str | list = DEFAULT_LORA_TARGETS
    """Module names that get adapters (e.g. [q_proj, v_proj]); `all-linear` = every linear projection of
    attention and MLP (not the output layer: put lm_head in modules_to_save to train it)."""
    modules_to_save: list | None = None
    """Modules trained whole beside the adapters and saved with them (e.g. [lm_head]). When template tokens are
    added to the vocabulary, embed_tokens and lm_head are added here by the trainer (it says so in the log)."""

    def __post_init__(self):
        _check_positive("model.lora.r", self.r)
        if not self.alpha > 0:
            raise ConfigError(f"model.lora.alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"model.lora.dropout must be in [0, 1), got {self.dropout}")
        targets = [self.target_modules] if isinstance(self.target_modules, str) else self.target_modules
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise ConfigError(f"model.lora.target_modules: expected `{DEFAULT_LORA_TARGETS}` or a non-empty list of "
                              f"module names, got {self.target_modules!r}")
        saved = self.modules_to_save or []
        if not all(isinstance(m, str) and m for m in saved):
            raise ConfigError(f"model.lora.modules_to_save: expected a list of module names, got "
                              f"{self.modules_to_save!r}")
        both = sorted(set(targets) & set(saved))
        if both:
            raise ConfigError(f"model.lora: {', '.join(both)} is in both target_modules and modules_to_save; a module "
                              "gets an adapter or trains whole, not both")
        if "lm_head" in targets:  # the chunked loss multiplies by lm_head.weight itself
            raise ConfigError("model.lora.target_modules: lm_head cannot take an adapter; train it whole with "
                              "model.lora.modules_to_save: [lm_head]")


@dataclass
class QuantizationConfig:
    """`model.quantization` (QLoRA): the frozen base is stored in 4 bits by bitsandbytes; adapters train on top."""

    bits: int = 4
    """Bits per frozen weight: 4 (bitsandbytes' Linear4bit)."""
    type: str = "nf4"
    """nf4 (normal-float, QLoRA's) or fp4."""
    double_quant: bool = True
    """Quantize the quantization constants too (about 0.4 bits per weight saved)."""
    compute_dtype: str = "bf16"
    """Precision of the matmuls on dequantized weights (bf16, fp16, fp32); the packed 4-bit weights are stored in
    this dtype too, so ZeRO-3 can partition them like any parameter (the FSDP/DeepSpeed QLoRA recipe)."""

    def __post_init__(self):
        if self.bits != 4:
            raise ConfigError(f"model.quantization.bits: only 4 is supported, got {self.bits}")
        _check_choice("model.quantization.type", self.type, QUANT_TYPES)
        _check_choice("model.quantization.compute_dtype", self.compute_dtype, QUANT_COMPUTE_DTYPES)


@dataclass
class ModelConfig:
    name_or_path: str = "embedded"
    """Local Hugging Face checkpoint folder, or `embedded` for the bundled SmolLM2-135M-Instruct."""
    template: str = "vicuna_v1.1"
    """Chat template used to encode conversations (and written into the exported tokenizer)."""
    attn_implementation: str = "auto"
    """auto = flash_attention_2 when installed on CUDA, else flex_attention on CUDA with packed rows (a
    document-causal block mask, no [T, T] mask), else sdpa; flex_attention anywhere when asked; eager only when
    asked."""
    gradient_checkpointing: bool = True
    """Recompute activations in backward (non-reentrant): much less memory for ~30% more compute."""
    rope_scaling: str | None = None
    """`linear` or `dynamic`: stretch RoPE so max_length fits a model trained on shorter contexts."""
    lora: LoraConfig | None = None
    """Train LoRA adapters on the frozen model (`{}` for the defaults); null = full fine-tuning."""
    quantization: QuantizationConfig | None = None
    """QLoRA: store the frozen base in 4 bits (bitsandbytes: CUDA, or the CPU since 0.46); needs `lora`."""

    def __post_init__(self):
        _check_choice("model.attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS)
        if self.rope_scaling is not None:
            _check_choice("model.rope_scaling", self.rope_scaling, ROPE_SCALING)
        if self.quantization is not None and self.lora is None:
            raise ConfigError("model.quantization freezes the base in 4 bits, so only adapters can train: set "
                              "model.lora too (`model.lora: {}` for the defaults)")


class DataSource(typing.NamedTuple):
    """One training file of a mix and its sampling weight (see `ds_vicuna.train.batching.weighted_epoch`)."""

    path: str
    weight: float = 1.0


def parse_sources(value: str | list, name: str = "data.train_path") -> list[DataSource]:
    """A path, or a list of paths and {path, weight} entries, as a list of DataSource ([] for "").

    Raises:
        ConfigError: an entry that is not a path or {path, weight}, or a weight that is not > 0, naming it.
    """
    if isinstance(value, str):
        return [DataSource(value)] if value else []
    if not value:
        raise ConfigError(f"{name}: an empty list; give a path or a list of {{path, weight}}")
    sources = []
    for i, entry in enumerate(value):
        where = f"{name}[{i}]"
        if isinstance(entry, str) and entry:
            entry = {"path": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not entry["path"]:
            raise ConfigError(f"{where}: expected a path or {{path: ..., weight: ...}}, got {entry!r}")
        unknown = set(entry) - {"path", "weight"}
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; known: path, weight")
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise ConfigError(f"{where}.weight: expected a number > 0, got {weight!r}")
        sources.append(DataSource(entry["path"], float(weight)))
    return sources


@dataclass
class DataConfig:
    train_path: str | list = ""
    """Training conversations (JSON/JSONL, ShareGPT or messages format), e.g. the output of `ds-vicuna data split`.
    Or a weighted mix: a list of paths and `{path: ..., weight: ...}` entries (weight 1 by default). Weight w
    trains on each sample of that file w times an epoch (0.5: a different half each epoch, seeded)."""
    eval_path: str | None = None
    """Held-out conversations; evaluated at every `train.eval_every` steps and at the end."""
    max_length: int = 2048
    """Tokens per sequence (per packed row with `batching: pack`)."""
    mask: str = "assistant"
    """Which tokens are trained on: assistant (every reply), last_turn, all."""
    batching: str = "pack"
    """pack = several conversations per row (no padding); group = pad within length-sorted groups; max = pad to
    max_length."""
    max_samples: int | None = None
    """Use only the first N conversations (quick runs)."""
    cache_dir: str | None = None
    """Where tokenized data is cached; default `<output_dir>/cache`."""

    def __post_init__(self):
        _check_choice("data.mask", self.mask, MASKS)
        _check_choice("data.batching", self.batching, BATCHING)
        _check_positive("data.max_length", self.max_length)
        if self.max_samples is not None:
            _check_positive("data.max_samples", self.max_samples)
        self.train_sources()  # a malformed mix fails here, naming the entry

    def train_sources(self) -> list[DataSource]:
        """`train_path` as a list of (path, weight); a single path is a mix of one, weight 1 (see `parse_sources`)."""
        return parse_sources(self.train_path)

    def named_paths(self) -> list[tuple[str, str]]:
        """(config field, path) of every data file, for the checks before training starts."""
        named = [(f"data.train_path[{i}]" if isinstance(self.train_path, list) else "data.train_path", s.path)
                 for i, s in enumerate(self.train_sources())]
        return named + ([("data.eval_path", self.eval_path)] if self.eval_path else [])


@dataclass
class TrainConfig:
    output_dir: str = "runs/train"
    """Checkpoints (`step-000200/`), metrics.jsonl, loss.png and the resolved config go here."""
    deepspeed: str = "zero3_offload"
    """DeepSpeed engine settings (ZeRO stage, offload): a bundled name (zero2, zero3, zero3_offload) or a JSON
    file; batch/bucket/precision fields are filled at start."""
    precision: str = "auto"
    """auto = bf16 on a bf16 GPU, fp16 with loss scaling on older GPUs, fp32 on CPU. bf16 on CPU when asked for
    (fast where the CPU has avx512_bf16/AMX, emulated and slower than fp32 elsewhere, half the memory anyway)."""
    learning_rate: float = 2e-5
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    max_grad_norm: float = 1.0
    epochs: int = 3
    max_steps: int | None = None
    """Stop after this many optimizer steps in total (the schedule is planned for it)."""
    global_batch_size: int = 128
    """Sequences per optimizer step over all ranks; kept whatever the world size (accumulation is derived)."""
    micro_batch_size: int = 2
    """Sequences per forward pass on one rank (per sequence-parallel group with sequence_parallel_size > 1)."""
    sequence_parallel_size: int = 1
    """Ulysses sequence parallelism (DeepSpeed ALST): split every row's tokens over this many consecutive ranks,
    which train the same micro-batches; must divide the world size and the model's attention heads."""
    seed: int = 42
    save_every: int = 200
    """Save a checkpoint every N optimizer steps (and always at the end)."""
    keep_last: int = 2
    """Keep the newest K complete checkpoints."""
    eval_every: int | None = None
    log_every: int = 1
    """Write a metrics record (metrics.jsonl, TensorBoard) every N optimizer steps, and at the run's last step."""
    resume: str | None = None
    """`auto` (newest complete checkpoint in output_dir, if any) or a checkpoint folder."""
    overwrite: bool = False
    """Start over in an output_dir that already holds a run (its checkpoints, metrics and loss curve are deleted
    first); without it, or `resume`, such a folder is an error. `--overwrite` alone on the command line means true."""
    stop_after_steps: int | None = None
    """Save and exit after this many steps of this run, as a preempted job would (resume continues)."""
    loss_chunk_tokens: int | None = DEFAULT_LOSS_CHUNK_TOKENS
    """Labelled tokens per lm_head + cross-entropy chunk: the loss never holds the whole [tokens, vocab] logits
    (see ds_vicuna/train/loss.py); null = the plain path that does (8 GiB in fp32 for 16K tokens x 128K vocabulary)."""
    memory_report: bool = False
    """Each rank writes output_dir/memory_rank<R>.json: its peak RSS in bytes when the loop starts (model loaded,
    engine built: `peak_rss_before_training_bytes`) and when it ends, before the final save (`peak_rss_bytes`)."""
    profile_step: int | None = None
    """Run this step of this run (1-based) under torch.profiler; each rank writes its operator table (sorted by
    self CPU time) to output_dir/profile_rank<R>.txt."""

    def __post_init__(self):
        _check_choice("train.precision", self.precision, PRECISIONS)
        _check_choice("train.lr_scheduler", self.lr_scheduler, SCHEDULERS)
        for name in ("global_batch_size", "micro_batch_size", "epochs", "save_every", "keep_last", "log_every",
                     "sequence_parallel_size"):
            _check_positive(f"train.{name}", getattr(self, name))
        for name in ("max_steps", "eval_every", "stop_after_steps", "loss_chunk_tokens", "profile_step"):
            if getattr(self, name) is not None:
                _check_positive(f"train.{name}", getattr(self, name))
        if self.learning_rate <= 0:
            raise ConfigError(f"train.learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.overwrite and self.resume is not None:
            raise ConfigError(f"train.overwrite and train.resume ({self.resume!r}) contradict each other: "
                              "continue a run or start it over, not both")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(f"train.global_batch_size ({self.global_batch_size}) must be a multiple of "
                              f"train.micro_batch_size ({self.micro_batch_size})")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def data_parallel_size(self, world_size: int) -> int:
        """Ranks that train different micro-batches: world_size / sequence_parallel_size.

        Raises:
            ConfigError: sequence_parallel_size does not divide the world size.
        """
        sp = self.train.sequence_parallel_size
        if world_size % sp:
            raise ConfigError(f"train.sequence_parallel_size ({sp}) must divide the world size ({world_size})")
        return world_size // sp

    def gradient_accumulation_steps(self, world_size: int) -> int:
        """global_batch_size / (micro_batch_size * data-parallel size).

        Raises:
            ConfigError: the global batch does not split evenly over the data-parallel ranks.
        """
        replicas = self.data_parallel_size(world_size)
        per_step = self.train.micro_batch_size * replicas
        if self.train.global_batch_size % per_step:
            what = "world size" if replicas == world_size else "data-parallel size (world / sequence_parallel_size)"
            raise ConfigError(
                f"train.global_batch_size ({self.train.global_batch_size}) is not a multiple of "
                f"micro_batch_size ({self.train.micro_batch_size}) x {what} ({replicas}); "
                f"world sizes that can train it: {', '.join(map(str, self.world_sizes()))} "
                f"(or, on a fresh start, a global batch divisible by {per_step})")
        return self.train.global_batch_size // per_step

    def world_sizes(self) -> list[int]:
        """The world sizes that split the global batch evenly (a resume keeps the global batch, so only these):
        sequence_parallel_size x every data-parallel size that divides the global batch's micro-batches."""
        micro_batches = self.train.global_batch_size // self.train.micro_batch_size
        sp = self.train.sequence_parallel_size
        return [n * sp for n in range(1, micro_batches + 1) if micro_batches % n == 0]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
_SECTION_CLASSES = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _check_positive(name: str, value: int) -> None:
    if value <= 0:
        raise ConfigError(f"{name} must be > 0, got {value}")


def _coerce(where: str, value: Any, annotation: Any) -> Any:
    """Check `value` against a field annotation (int, float, bool, str, X | None, a nested section such as
    `model.lora`); ints widen to float."""
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            keys = ", ".join(f.name for f in dataclasses.fields(annotation))
            raise ConfigError(f"{where}: expected a mapping of {keys} (or {{}} for the defaults), got "
                              f"{type(value).__name__} {value!r}")
        source, name = where.split(": ", 1)
        return _build_fields(annotation, value, source, name)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for option in inner[1:]:  # str | list: a value of any listed type is fine
            if isinstance(value, option) and not (option is int and isinstance(value, bool)):
                return value
        return _coerce(where, value, inner[0])
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads "1e-4" (no dot) as a string
        except ValueError:
            pass
    if annotation is int and isinstance(value, bool) or not isinstance(value, annotation):
        raise ConfigError(f"{where}: expected {annotation.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build_section(name: str, values: dict, source: str) -> Any:
    return _build_fields(_SECTION_CLASSES[name], values, source, name)


def _build_fields(cls, values: dict, source: str, name: str) -> Any:
    """`cls(**values)` with each value checked against its field; `name` is the dotted section (`model.lora`)."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{source}: unknown key {name}.{key}; known: {', '.join(sorted(known))}")
        kwargs[key] = _coerce(f"{source}: {name}.{key}", value, hints[key])
    return cls(**kwargs)


def config_from_dict(raw: dict, source: str = "config") -> Config:
    """Build a Config from nested {"model": {...}, "data": {...}, "train": {...}}.

    Raises:
        ConfigError: unknown section or key, wrong type, or a rejected value, naming `source`.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping with sections {', '.join(SECTIONS)}")
    unknown = set(raw) - set(SECTIONS)
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {', '.join(sorted(unknown))}; known: {', '.join(SECTIONS)}")
    for name, values in raw.items():
        if values is not None and not isinstance(values, dict):
            raise ConfigError(f"{source}: section {name} must be a mapping")
    return Config(**{name: _build_section(name, raw.get(name) or {}, source) for name in SECTIONS})


def parse_overrides(args: Sequence[str]) -> list[tuple[str, str]]:
    """`["--train.lr", "1", "data.max_length=512", "--flag=x"]` -> [(key, raw value), ...].

    A yes/no key followed by nothing or by another `--key` (`--overwrite`) means true.

    Raises:
        ConfigError: a dangling `--key` without a value or an argument that is not key=value / --key value.
    """
    pairs, i = [], 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            key = arg[2:]
            if "=" in key:
                key, value = key.split("=", 1)
            elif _is_flag(key) and (i + 1 == len(args) or args[i + 1].startswith("--")):
                value = "true"  # `--overwrite` alone: a yes/no key needs no value
            elif i + 1 < len(args):
                i += 1
                value = args[i]
            else:
                raise ConfigError(f"override {arg} has no value")
        elif "=" in arg:
            key, value = arg.split("=", 1)
        else:
            raise ConfigError(f"cannot read argument {arg!r}: use --key value or key=value")
        pairs.append((key.replace("-", "_"), value))
        i += 1
    return pairs


def _is_flag(key: str) -> bool:
    """True when `key` (dotted or bare) names a yes/no field."""
    key = key.replace("-", "_")
    section, name = key.split(".", 1) if "." in key else (None, key)
    classes = [_SECTION_CLASSES[section]] if section in _SECTION_CLASSES else list(_SECTION_CLASSES.values())
    return any(typing.get_type_hints(cls).get(name) is bool for cls in classes)


def _resolve_key(key: str) -> tuple[str, str]:
    if "." in key:
        section, name = key.split(".", 1)
        if section not in SECTIONS:
            raise ConfigError(f"override {key}: unknown section {section!r}; known: {', '.join(SECTIONS)}")
        return section, name
    owners = [s for s, cls in _SECTION_CLASSES.items() if key in {f.name for f in dataclasses.fields(cls)}]
    if not owners:
        raise ConfigError(f"override --{key}: unknown key")
    if len(owners) > 1:
        raise ConfigError(f"override --{key} is ambiguous; write one of {', '.join(f'{s}.{key}' for s in owners)}")
    return owners[0], key


def _bundled(package: str, suffix: str) -> dict[str, Path]:
    """name -> file of the config files installed with the package (`zero3` -> .../ds_configs/zero3.json)."""
    folder = resources.files(package)
    return {Path(entry.name).stem: Path(str(entry)) for entry in folder.iterdir() if entry.name.endswith(suffix)}


def bundled_deepspeed_configs() -> dict[str, Path]:
    """The DeepSpeed configs installed with the package, by name: zero2, zero3, zero3_offload."""
    return _bundled(DEEPSPEED_PACKAGE, ".json")


def example_configs() -> dict[str, Path]:
    """The example training configs installed with the package, by name (`demo`, `vicuna_7b`, ...)."""
    return _bundled(EXAMPLES_PACKAGE, ".yaml")


def config_file_path(path: str | os.PathLike) -> Path:
    """A training config as a file: an existing path, else the name of a bundled example (`demo`).

    Raises:
        ConfigError: neither, listing the bundled names.
    """
    p = Path(path)
    if p.is_file():
        return p
    examples = example_configs()
    if str(path) in examples:
        return examples[str(path)]
    raise ConfigError(f"config file {p} not found (bundled examples: {', '.join(sorted(examples))})")


# (section, key, values that are names, not paths): relative paths in a config file are read from its folder
_INPUT_PATHS = (("data", "train_path", ()), ("data", "eval_path", ()), ("model", "name_or_path", ("embedded",)),
                ("train", "resume", ("auto",)), ("train", "deepspeed", None))


def resolve_config_paths(raw: dict, folder: Path) -> dict:
    """`raw` (a config file's sections) with each relative input path joined to `folder`, the file's folder.

    Outputs (`train.output_dir`, `data.cache_dir`) stay relative to the current folder; bundled names
    (`zero3`, `embedded`, `auto`) are kept as they are.
    """
    def join(value):
        if isinstance(value, dict) and isinstance(value.get("path"), str):
            return {**value, "path": join(value["path"])}
        if not isinstance(value, str) or not value or os.path.isabs(value):
            return value
        return os.path.normpath(os.path.join(folder, value))

    out = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for section, key, names in _INPUT_PATHS:
        values = out.get(section)
        if not isinstance(values, dict) or key not in values:
            continue
        value = values[key]
        names = bundled_deepspeed_configs() if names is None else names
        if isinstance(value, str) and value in names:
            continue
        values[key] = [join(v) for v in value] if isinstance(value, list) else join(value)
    return out


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config (or defaults when `path` is None) and apply CLI overrides.

    Args:
        path: a YAML file, the name of a bundled example (`demo`), or None for the defaults. Relative input
            paths inside it are read from its folder (see `resolve_config_paths`); overrides from the current one.

    Raises:
        ConfigError: missing/invalid YAML, unknown keys, wrong types, contradictions.
    """
    import yaml

    raw: dict = {}
    source = str(path) if path else "defaults"
    if path is not None:
        p = config_file_path(path)
        source = str(p)
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{p}: not valid YAML ({err})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: expected a mapping with sections {', '.join(SECTIONS)}")
        raw = resolve_config_paths(raw, p.parent)
    raw = {k: dict(v or {}) if isinstance(v, dict) or v is None else v for k, v in raw.items()}
    for key, text in parse_overrides(overrides):
        section, name = _resolve_key(key)
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"{source}: section {section} must be a mapping")
        *parents, leaf = name.split(".")  # model.lora.r: a key of a nested section
        node = raw[section]
        for part in parents:
            child = node.get(part)
            if not isinstance(child if child is not None else {}, dict):
                raise ConfigError(f"override {key}: {section}.{part} is {child!r}, not a mapping")
            node[part] = dict(child or {})
            node = node[part]
        node[leaf] = yaml.safe_load(text) if text != "" else ""
    return config_from_dict(raw, source if not overrides else f"{source} + overrides")


# --------------------------------------------------------------------------------------------------- DeepSpeed


def deepspeed_config_path(name_or_path: str | os.PathLike) -> Path:
    """`train.deepspeed` as a file: a bundled name (zero2, zero3, zero3_offload) or a path.

    Raises:
        ConfigError: neither, listing the bundled names.
    """
    bundled = bundled_deepspeed_configs()
    if str(name_or_path) in bundled:
        return bundled[str(name_or_path)]
    p = Path(name_or_path)
    if not p.is_file():
        raise ConfigError(f"train.deepspeed: {p} not found; give a JSON file or a bundled name: "
                          f"{', '.join(sorted(bundled))}")
    return p


def load_deepspeed_config(name_or_path: str | os.PathLike) -> dict:
    """Read DeepSpeed engine settings: a bundled name (`zero3_offload`) or a JSON file.

    Raises:
        ConfigError: missing file, bad JSON, or batch fields set (they are derived from the training config).
    """
    p = deepspeed_config_path(name_or_path)
    try:
        ds = json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{p}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    if not isinstance(ds, dict) or not isinstance(ds.get("zero_optimization", {}), dict):
        raise ConfigError(f"{p}: expected an object with a zero_optimization object")
    clashing = [k for k in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
                if ds.get(k) not in (None, "auto")]
    if clashing:
        raise ConfigError(f"{p}: {', '.join(clashing)} are derived from train.global_batch_size/micro_batch_size; "
                          "remove them or set them to \"auto\"")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{p}: zero_optimization.stage must be 0-3, got {stage!r}")
    return ds


def offloads_optimizer(ds: dict) -> bool:
    """True when the DeepSpeed dict puts optimizer states on the CPU (needs DeepSpeedCPUAdam)."""
    offload = ds.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device", "none") == "cpu"


def resolve_precision(requested: str, device_type: str, bf16_supported: bool) -> str:
    """auto -> bf16 on a bf16 GPU, fp16 on an older GPU, fp32 on CPU (exact, reproducible); explicit choices are
    checked: bf16 runs on a CPU whose torch can do bf16 (oneDNN), fp16 needs a GPU.

    Raises:
        ConfigError: fp16 asked for on CPU, or bf16 on a device without it.
    """
    if requested == "auto":
        if device_type == "cpu":
            return "fp32"
        return "bf16" if bf16_supported else "fp16"
    if device_type == "cpu" and requested == "fp16":
        raise ConfigError("train.precision fp16 needs a GPU; on CPU use bf16, fp32 or auto")
    if requested == "bf16" and not bf16_supported:
        raise ConfigError(f"train.precision bf16: this {'CPU' if device_type == 'cpu' else 'GPU'} has no bf16 "
                          "support; use auto")
    return requested


def fill_deepspeed_config(ds: dict, *, micro_batch_size: int, grad_accum: int, world_size: int,
                          hidden_size: int, precision: str, max_grad_norm: float,
                          sequence_parallel_size: int = 1) -> dict:
    """A copy of `ds` with batch sizes, "auto" bucket sizes and precision written in (what HF Trainer would do).

    Buckets follow transformers' `HfTrainerDeepSpeedConfig`: reduce_bucket_size = h*h,
    stage3_prefetch_bucket_size = 0.9*h*h, stage3_param_persistence_threshold = 10*h. With sequence parallelism
    the batch counts data-parallel replicas (world / sequence_parallel_size), as DeepSpeed does.
    """
    out = json.loads(json.dumps(ds))
    out["train_micro_batch_size_per_gpu"] = micro_batch_size
    out["gradient_accumulation_steps"] = grad_accum
    out["train_batch_size"] = micro_batch_size * grad_accum * (world_size // sequence_parallel_size)
    if sequence_parallel_size > 1:  # read by zero.Init (HfDeepSpeedConfig) before the engine gets the mpu
        out["sequence_parallel_size"] = sequence_parallel_size
    if out.get("gradient_clipping", "auto") == "auto":
        out["gradient_clipping"] = max_grad_norm
    zero = out.setdefault("zero_optimization", {})
    buckets = {"reduce_bucket_size": hidden_size * hidden_size,
               "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
               "stage3_param_persistence_threshold": 10 * hidden_size}
    for key, value in buckets.items():
        if zero.get(key) == "auto":
            zero[key] = value
    out["bf16"] = {**out.get("bf16", {}), "enabled": precision == "bf16"}
    fp16 = {k: v for k, v in out.get("fp16", {}).items() if v != "auto"}
    if precision == "fp16":  # dynamic loss scaling: fp16 gradients underflow without it
        fp16 = {"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2,
                "min_loss_scale": 1, **fp16}
    out["fp16"] = {**fp16, "enabled": precision == "fp16"}
    leftover = _find_auto(out)
    if leftover:
        raise ConfigError(f"DeepSpeed config: cannot resolve \"auto\" for {', '.join(leftover)}")
    return out


def _find_auto(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in _find_auto(v, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if node == "auto" else []
