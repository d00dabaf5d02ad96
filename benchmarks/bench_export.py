"""Export memory and time: the streaming `ds-vicuna export` vs the whole-model export it replaced, two model
sizes 4x apart, side by side in one run.

    TORCH_EXTENSIONS_DIR=.torch_extensions python benchmarks/bench_export.py            # hidden 640 and 1280
    python benchmarks/bench_export.py --hidden 512 --max-shard-size 50MB --keep /tmp/bench_export

Each size gets a real 2-rank ZeRO-3 + CPU offload checkpoint (the trainer, one step, random-init Llama with
8 layers, vocabulary 12.5 x hidden, so the larger model has exactly 4x the parameters). Every export runs in its
own process; its peak RSS is that process's VmHWM (which counts the memory-mapped file pages it touched).
The whole-model baseline is the previous export: instantiate the model in fp32, load DeepSpeed's consolidated fp32
state dict into it, cast, `save_pretrained`.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = 8
WORDS = ("alpha beta gamma delta apple river stone cloud music paper light table window garden yellow "
         "purple quick slow happy quiet tiger horse eagle seven eleven twenty forty vicuna chat model").split()


def write_text_data(folder: Path, n: int, seed: int = 0) -> tuple[Path, Path]:
    """The benchmark's own text: `n` short ShareGPT conversations and a corpus for the tokenizer."""
    rng = random.Random(seed)
    sentence = lambda k: " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, k)))  # noqa: E731
    data, corpus = folder / "train.jsonl", folder / "corpus.txt"
    data.write_text("".join(json.dumps({"id": f"c{i}", "conversations": [
        {"from": "human", "value": sentence(8)}, {"from": "gpt", "value": sentence(8)}]}) + "\n" for i in range(n)))
    corpus.write_text("\n".join(sentence(14) for _ in range(400)) + "\n")
    return data, corpus


def make_model(folder: Path, hidden: int, corpus: Path) -> Path:
    """A random-init Llama (LAYERS layers, vocabulary 12.5 x hidden) with a 400-piece sentencepiece tokenizer
    trained on `corpus`, saved Hugging Face style."""
    import sentencepiece as spm
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                   minloglevel=2)
    LlamaTokenizer.from_pretrained(str(folder)).save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=hidden * 25 // 2, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=512, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def make_checkpoint(folder: Path, hidden: int) -> Path:
    """A random Llama of this width, trained one step by 2 ranks; returns the checkpoint folder."""
    folder.mkdir(parents=True, exist_ok=True)
    data, corpus = write_text_data(folder, n=8, seed=1)
    model = make_model(folder / "model", hidden, corpus)
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--module", "ds_vicuna.train",
               "--model.name_or_path", str(model), "--train_path", str(data), "--max_length", "256",
               "--batching", "pack", "--output_dir", str(folder / "out"), "--max_steps", "1",
               "--global_batch_size", "2", "--micro_batch_size", "1",
               "--deepspeed", str(REPO / "ds_configs" / "zero3_offload.json")]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
    print(f"[bench] hidden {hidden}: training one step for a 2-rank checkpoint", flush=True)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env=env, cwd=REPO)
    return folder / "out" / "step-000001"


def parameter_count(model: Path) -> int:
    from safetensors import safe_open

    with safe_open(model / "model.safetensors", "pt") as weights:
        return sum(_prod(weights.get_slice(name).get_shape()) for name in weights.keys())


def _prod(shape) -> int:
    out = 1
    for dim in shape:
        out *= dim
    return out


def export_whole_model(checkpoint: Path, out: Path, dtype: str) -> None:
    """The export this repository had before streaming: the whole model and its fp32 weights in memory."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(checkpoint / "hf")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name),
                          strict=False)
    model.to({"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]).save_pretrained(out, safe_serialization=True)


def child(args) -> None:
    """One measured export in this process; prints {"seconds", "max_rss_mb"} as its last line."""
    import torch  # noqa: F401 - imported before the clock starts in every arm, as the baseline arm does

    started = time.perf_counter()
    if args.child == "streaming":
        from ds_vicuna.train.export import export_checkpoint, parse_size

        export_checkpoint(args.checkpoint, args.out, args.dtype, parse_size(args.max_shard_size), progress=False)
    elif args.child == "whole":
        export_whole_model(Path(args.checkpoint), Path(args.out), args.dtype)
    else:  # "imports": the interpreter with torch, transformers and deepspeed loaded, nothing exported
        import deepspeed.utils.zero_to_fp32  # noqa: F401
        import transformers  # noqa: F401
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "max_rss_mb": peak_rss_mb()}))


def peak_rss_mb() -> float:
    """This process's peak RSS since its exec (VmHWM). Not ru_maxrss: Linux carries that over exec from the
    parent, so every child of a big parent would report at least the parent's peak."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 1024


def measure(kind: str, checkpoint: Path, out: Path, dtype: str, shard: str) -> dict:
    command = [sys.executable, __file__, "--child", kind, "--checkpoint", str(checkpoint), "--out", str(out),
               "--dtype", dtype, "--max-shard-size", shard]
    proc = subprocess.run(command, check=True, capture_output=True, text=True, cwd=REPO)
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=640, help="width of the smaller model (the other is 2x)")
    parser.add_argument("--max-shard-size", default="100MB")
    parser.add_argument("--keep", help="folder for the checkpoints (reused when present); default a temp dir")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="bf16", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    root = Path(args.keep or tempfile.mkdtemp(prefix="bench_export_"))
    sizes = {}
    for hidden in (args.hidden, 2 * args.hidden):
        folder = root / f"h{hidden}"
        checkpoint = folder / "out" / "step-000001"
        if not (checkpoint / "ds_vicuna_complete.json").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            make_checkpoint(folder, hidden)
        sizes[hidden] = (checkpoint, parameter_count(folder / "model"))
    base = measure("imports", root, root / "none", "bf16", args.max_shard_size)["max_rss_mb"]
    rows = []
    for hidden, (checkpoint, params) in sizes.items():
        for kind, dtype in (("whole", "fp32"), ("streaming", "fp32"), ("streaming", "bf16")):
            result = measure(kind, checkpoint, root / "export", dtype, args.max_shard_size)
            rows.append({"hidden": hidden, "params": params, "kind": kind, "dtype": dtype, **result})
            print(f"[bench] {json.dumps(rows[-1])}", flush=True)
    report(rows, base, args.max_shard_size)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


def report(rows: list[dict], base_mb: float, shard: str) -> None:
    """A markdown table, and per arm: extra peak RSS of the 4x model over its extra fp32 weight bytes."""
    print(f"\ninterpreter with torch + transformers + deepspeed imported: {base_mb:.0f} MB peak RSS\n")
    print("| model | fp32 weights | export | peak RSS | above interpreter | time |")
    print("|---|---:|---|---:|---:|---:|")
    for r in rows:
        name = {"whole": "whole model (previous)", "streaming": f"streaming, shards <= {shard}"}[r["kind"]]
        print(f"| hidden {r['hidden']}, {r['params'] / 1e6:.0f}M params | {r['params'] * 4 / 1e6:.0f} MB | "
              f"{name}, {r['dtype']} | {r['max_rss_mb']:.0f} MB | {r['max_rss_mb'] - base_mb:.0f} MB | "
              f"{r['seconds']:.1f} s |")
    print()
    small, big = sorted({r["hidden"] for r in rows})
    for kind, dtype in dict.fromkeys((r["kind"], r["dtype"]) for r in rows):
        a, b = (next(r for r in rows if (r["hidden"], r["kind"], r["dtype"]) == (h, kind, dtype)) for h in (small, big))
        extra_fp32_mb = (b["params"] - a["params"]) * 4 / 1e6
        ratio = (b["max_rss_mb"] - a["max_rss_mb"]) / extra_fp32_mb
        print(f"{kind} {dtype}: 4x model adds {b['max_rss_mb'] - a['max_rss_mb']:.0f} MB peak RSS for "
              f"{extra_fp32_mb:.0f} MB more fp32 weights = {ratio:.2f}x (goal < 0.5x)")


if __name__ == "__main__":
    main()
