"""Tiny fixtures for trainer tests: a 400-piece sentencepiece tokenizer, a 2-layer Llama, a few conversations.

    from tests.support.tiny_llama import make_tiny_model, write_conversations, write_train_config
    model_dir = make_tiny_model(tmp_path / "model")      # config.json, model.safetensors, tokenizer
    data = write_conversations(tmp_path / "train.jsonl", n=32, seed=0)
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Bounds for a resume at another world size. Any resume moves weights by an ulp or two (DeepSpeedCPUAdam recomputes
# beta**t with pow() instead of continuing its running product), and another world size also sums the gradients
# in another order (2 ranks x 2 accumulated micro-batches, then reduced, vs 4 accumulated on one rank). Measured:
# test_train_resume.py (6 steps) losses within 8.3e-7 relative and weights within 3.4e-7, as for a resume at the
# same world size; test_launch.py (16 steps, SIGTERM) 2 -> 1: 7.1e-8 and 1.2e-7, 1 -> 2: 5.3e-8 and 1.2e-7.
# DeepSpeed's universal load without our param-group fix is off by 9.5e-5 (losses) and 7.5e-4 (norm weights).
ELASTIC_LOSS_RTOL = 1e-5
ELASTIC_WEIGHT_ATOL = 2e-6
WORDS = ("alpha beta gamma delta apple river stone cloud music paper light table window garden yellow "
         "purple quick slow happy quiet tiger horse eagle seven eleven twenty forty vicuna chat model").split()


def _corpus(path: Path) -> None:
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) for _ in range(400)]
    lines += ["USER: ASSISTANT: A chat between a curious user and an artificial intelligence assistant."] * 20
    path.write_text("\n".join(lines) + "\n")


def make_tiny_model(folder: Path, seed: int = 0, hidden: int = 64, layers: int = 2, dropout: float = 0.0,
                    vocab_size: int | None = None, max_positions: int = 512) -> Path:
    """A random-init Llama (hidden 64, 2 layers) with a trained sentencepiece tokenizer, saved HF-style.

    `dropout` > 0 sets attention dropout, so training draws random numbers (resume tests check RNG handling);
    `vocab_size` above the tokenizer's 400 pieces makes the embeddings as large as a real model's; `max_positions` is
    its max_position_embeddings."""
    import sentencepiece as spm
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.txt"
    _corpus(corpus)
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, bos_id=1, eos_id=2, unk_id=0,
                                   pad_id=-1, minloglevel=2)
    corpus.unlink()
    tokenizer = LlamaTokenizer.from_pretrained(str(folder))
    tokenizer.save_pretrained(folder)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size or len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=max_positions, bos_token_id=1, eos_token_id=2,
                         tie_word_embeddings=False, attention_dropout=dropout)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def make_adapter(model_dir: Path, out: Path, r: int, targets, seed: int) -> Path:
    """A peft LoRA adapter folder for `model_dir` with random A and B (peft's default B = 0 would change nothing),
    saved by peft itself."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.2)  # a visible but moderate change of the logits
    model.save_pretrained(out)
    return Path(out)


def write_conversations(path: Path, n: int = 32, seed: int = 0, max_words: int = 30) -> Path:
    """ShareGPT JSONL conversations of skewed lengths (one or two turns)."""
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for i in range(n):
            turns = []
            for _ in range(rng.choice((1, 1, 2))):
                turns.append({"from": "human", "value": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8)))})
                turns.append({"from": "gpt", "value": " ".join(rng.choice(WORDS)
                                                              for _ in range(rng.randint(1, max_words)))})
            fh.write(json.dumps({"id": f"c{i}", "conversations": turns}) + "\n")
    return Path(path)


def write_train_config(path: Path, model, data: Path, deepspeed: str = "zero3_offload", data_opts: dict | None = None,
                       **train) -> Path:
    """A trainer YAML: `model`, `data` (max_length 512 unless `data_opts` says otherwise), the bundled
    `ds_configs/<deepspeed>.json`, and `train` keys as given."""
    import yaml

    config = {"model": {"name_or_path": str(model)},
              "data": {"train_path": str(data), "max_length": 512, **(data_opts or {})},
              "train": {"deepspeed": str(REPO / "ds_configs" / f"{deepspeed}.json"),
                        **{k: str(v) if isinstance(v, Path) else v for k, v in train.items()}}}
    Path(path).write_text(yaml.safe_dump(config, sort_keys=False))
    return Path(path)


def write_resume_run(tmp: Path) -> Path:
    """The exact-resume suites' run (tests/train/test_loop_resume.py, test_lora.py): a tiny model with dropout, 36
    conversations packed, 2 epochs of 4-row steps, a checkpoint every 2 steps (5 kept), decayed weights. Returns its
    config."""
    model = make_tiny_model(tmp / "model", dropout=0.1)
    data = write_conversations(tmp / "train.jsonl", n=36, seed=3)
    return write_train_config(tmp / "cfg.yaml", model, data, data_opts={"batching": "pack"}, learning_rate=3.0e-3,
                              warmup_ratio=0.2, epochs=2, global_batch_size=4, micro_batch_size=1, save_every=2,
                              keep_last=5, weight_decay=0.1)


def copy_checkpoint(run_dir: Path, step: str, out: Path) -> Path:
    """A fresh output folder `out` holding only `run_dir`'s checkpoint `step` (e.g. "step-000002") as its latest:
    what a resumed run finds after a stop at that step."""
    import shutil

    out.mkdir()
    shutil.copytree(run_dir / step, out / step)
    (out / "latest").write_text(step)
    return out


def subprocess_env(gpu: bool = False) -> dict:
    """Environment for launched trainers: shared CPU-Adam build, quiet, repo importable; no GPU unless `gpu`."""
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
    env.update({"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
                "PYTHONPATH": str(REPO) + os.pathsep + str(REPO / "tests") + os.pathsep + env.get("PYTHONPATH", "")})
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def deepspeed_command(num_ranks: int, script: str | Path, *args: str, port: int | None = None) -> list[str]:
    """The real `deepspeed --num_gpus N script args` launcher (its runner module, so any venv works), free port."""
    from ds_vicuna.train.launch_env import free_port

    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_ranks),
            "--master_port", str(port or free_port()), str(script), *map(str, args)]


def run_checked(cmd: list, timeout: int = 300, gpu: bool = False, **kwargs) -> subprocess.CompletedProcess:
    """Run a command (GPUs hidden unless `gpu`); on failure raise with the last of its output so the log shows why."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                          env=subprocess_env(gpu), **kwargs)
    if proc.returncode != 0:
        command = " ".join(map(str, cmd))
        raise AssertionError(f"{command} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc
