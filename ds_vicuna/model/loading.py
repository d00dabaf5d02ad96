"""The one way to load a chat model for inference, used by the serving worker, `eval answer` and the demo.

    chat = load_chat_model("out/vicuna-7b", device="auto", dtype="auto")   # or "embedded"
    ids = chat.encoder.encode_prompt(messages)   # the prompt training's encoder builds
    chat.stop_token_ids, chat.stop_strings, chat.context_length, chat.reply_lead

A checkpoint folder (or `embedded`) becomes model + tokenizer + encoder + template + stops + context length,
read from the folder's model card (`ds_vicuna.json`, see `ds_vicuna.model.card`); a folder without one uses its
tokenizer's own chat template. Placement and precision follow one policy:

    device  auto (the current CUDA GPU when there is one, else the CPU) | cuda | cuda:N | cpu
    dtype   auto (bf16 on GPUs that have it, fp16 on older GPUs, fp32 on the CPU) | bf16 | fp16 | fp32
    device_map "auto": one model spread over every visible GPU (accelerate's placement); else one device

Attention is PyTorch SDPA. The recipe for a multi-GPU node is one worker per GPU (`--device cuda:N`);
`--device-map auto` is for a model too big for one GPU.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ds_vicuna.model.card import ModelCard, read_model_card

log = logging.getLogger(__name__)

DEVICES = "auto, cuda, cuda:N or cpu"
DTYPE_CHOICES = ("auto", "bf16", "fp16", "fp32")  # every --dtype / train.precision flag offers these
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
FALLBACK_CONTEXT = 2048


@dataclass
class ChatModel:
    """A model ready for chat inference.

    Attributes:
        name: the name clients use (folder name, or the embedded model's name).
        model: the Hugging Face causal LM, in eval mode, on its device(s).
        tokenizer: its tokenizer.
        encoder: `ds_vicuna.chat.encoding.ConversationEncoder` for (tokenizer, template): builds prompts exactly as
            training built samples.
        template: the chat template's name.
        stop_token_ids: ids that end a reply (the template's stop tokens, EOS and generation_config's EOS ids).
        stop_strings: the template's stop texts; a reply is cut before them even when the model spells one out.
        context_length: the longest prompt + reply served.
        reply_lead: text the template puts between the assistant header and a reply that the model writes
            itself (vicuna_v1.1: the space in "ASSISTANT: reply"); dropped from replies so a client's history
            renders the way training rendered it.
        card: the model card it was loaded with.
    """

    name: str
    model: Any
    tokenizer: Any
    encoder: Any
    template: str
    stop_token_ids: list[int]
    stop_strings: list[str]
    context_length: int
    reply_lead: str = ""
    card: ModelCard = field(default_factory=ModelCard)

    @classmethod
    def build(cls, model, tokenizer, template: str | None = None, name: str = "model",
              card: ModelCard | None = None) -> "ChatModel":
        """Wrap an already loaded model and tokenizer (the template defaults to the card's)."""
        from ds_vicuna.chat.encoding import get_encoder

        card = card or ModelCard()
        encoder = get_encoder(tokenizer, template or card.template)
        stops = list(dict.fromkeys(encoder.stop_strings() + (list(card.stop_strings)
                                                              if encoder.template.name == card.template else [])))
        generation = getattr(model, "generation_config", None)
        return cls(name, model, tokenizer, encoder, encoder.template.name,
                   stop_token_ids(tokenizer, stops, getattr(generation, "eos_token_id", None)), stops,
                   context_length(model.config, tokenizer, card), reply_lead(encoder), card)

    @property
    def device(self):
        """Where input ids go: the device of the input embeddings (the first GPU of a spread model)."""
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self):
        return self.model.get_input_embeddings().weight.dtype


def load_chat_model(model: str, template: str | None = None, name: str | None = None, device: str = "auto",
                    dtype: str = "auto", device_map: str | None = None,
                    attn_implementation: str = "sdpa") -> ChatModel:
    """Load a checkpoint folder or "embedded" for chat inference.

    Args:
        model: a local Hugging Face checkpoint folder or "embedded" (nothing is downloaded).
        template: chat template name; default: the card's, else the tokenizer's own chat template.
        name: the name clients use; default: the folder name.
        device: auto | cuda | cuda:N | cpu.
        dtype: auto | bf16 | fp16 | fp32.
        device_map: "auto" (or another accelerate policy) to spread the model over every visible GPU.
        attn_implementation: transformers' attention kernel ("sdpa"; "eager" for models without SDPA).

    Raises:
        FileNotFoundError: no such checkpoint. ValueError: a bad device/dtype/device_map (naming the flag) or
            a bad model card (naming the file and field). TemplateError: a template the tokenizer cannot use.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ds_vicuna.model.embedded import EMBEDDED_MODEL, resolve_model_path

    path = resolve_model_path(model)
    card = read_model_card(path)
    if device_map is not None and device_map not in DEVICE_MAPS:
        raise ValueError(f"--device-map: expected one of {', '.join(DEVICE_MAPS)}, got {device_map!r}")
    target = resolve_device(device) if device_map is None else None
    torch_dtype = resolve_dtype(dtype, target if target is not None else _any_gpu_device())
    placement = {"device_map": device_map} if device_map else \
        {"device_map": {"": target}} if target.type == "cuda" else {}  # straight to the GPU, no host copy
    tokenizer = AutoTokenizer.from_pretrained(path)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, attn_implementation=attn_implementation,
                                              **placement).eval()
    default_name = EMBEDDED_MODEL if str(model) in ("embedded", EMBEDDED_MODEL) else Path(path).name
    chat = ChatModel.build(lm, tokenizer, template, name or default_name, card)
    log.info("loaded %s (%s) on %s as %s, template %s, context %d", chat.name, path,
             getattr(lm, "hf_device_map", None) or chat.device, chat.dtype, chat.template, chat.context_length)
    return chat


def resolve_device(device: str = "auto"):
    """`auto|cuda|cuda:N|cpu` -> a torch.device.

    Raises:
        ValueError: an unknown spelling, CUDA asked for where there is none, or a GPU index that does not exist.
    """
    import torch

    text = str(device).strip().lower()
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if match is None:
        raise ValueError(f"--device: expected {DEVICES}, got {device!r}")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is visible (torch {torch.__version__}: "
                         "torch.cuda.is_available() is False); use --device cpu or auto")
    index = int(match.group(1)) if match.group(1) is not None else torch.cuda.current_device()
    count = torch.cuda.device_count()
    if index >= count:
        raise ValueError(f"--device {device}: only {count} CUDA device(s) are visible (cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index)


def resolve_dtype(dtype: str, device):
    """`auto|bf16|fp16|fp32` -> a torch dtype; auto is bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU.

    Raises:
        ValueError: an unknown spelling.
    """
    import torch

    if dtype not in DTYPE_CHOICES:
        raise ValueError(f"--dtype: expected one of {', '.join(DTYPE_CHOICES)}, got {dtype!r}")
    if dtype != "auto":
        return torch_dtype(dtype)
    if device is None or torch.device(device).type != "cuda":
        return torch.float32
    major, _ = torch.cuda.get_device_capability(torch.device(device))
    return torch.bfloat16 if major >= 8 else torch.float16  # bf16 tensor cores arrived with Ampere (8.0)


def torch_dtype(name: str):
    """`bf16|fp16|fp32` -> the torch dtype (what a resolved `auto` or an explicit choice stands for).

    Raises:
        ValueError: another name.
    """
    import torch

    named = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if name not in named:
        raise ValueError(f"dtype: expected one of {', '.join(named)}, got {name!r}")
    return named[name]


def _any_gpu_device():
    """The first GPU when a model is spread over GPUs (dtype policy), or None without CUDA."""
    import torch

    return torch.device("cuda", 0) if torch.cuda.is_available() else None


def stop_token_ids(tokenizer, stop_strings: Sequence[str], generation_eos=None) -> list[int]:
    """Ids that end a reply: stop strings that are one special token, the tokenizer's EOS, generation_config's EOS.

    A stop string that is not one special token (e.g. "USER:") is matched as text by the engine instead.
    """
    from ds_vicuna.chat.templates import special_token_strings

    specials = special_token_strings(tokenizer)
    ids = {specials[s] for s in stop_strings if s in specials}
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if generation_eos is not None:
        ids.update(int(i) for i in ([generation_eos] if isinstance(generation_eos, int) else generation_eos))
    return sorted(ids)


def context_length(config, tokenizer, card: ModelCard) -> int:
    """The card's `context_length`, else the model config's position limit, else the tokenizer's, else 2048."""
    if card.context_length:
        return int(card.context_length)
    config = getattr(config, "text_config", None) or config
    for key in ("max_position_embeddings", "max_sequence_length", "seq_length", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if isinstance(limit, int) and 0 < limit < 10 ** 7 else FALLBACK_CONTEXT


def reply_lead(encoder) -> str:
    """The text between the assistant header and a reply's content that the model writes itself ("" or " ").

    Read off the encoder's own layout of a probe conversation: the characters a reply owns before its content.
    """
    from ds_vicuna.chat.messages import validate_messages

    content = "\ue010"
    messages = validate_messages([{"role": "user", "content": "a"}, {"role": "assistant", "content": content}])
    layout = encoder.layout(messages)
    owned = "".join(layout.text[p.start:p.end] for p in layout.pieces if p.owner == 1)
    return owned[:-len(content)] if owned.endswith(content) else ""
