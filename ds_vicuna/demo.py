"""`make demo`: the whole product on the embedded default, on a CPU box, in a few minutes.

    make demo                                   # = python -m ds_vicuna.demo
    python -m ds_vicuna.demo --out runs/demo --ranks 2 --epochs 4

bundled ShareGPT sample -> `ds-vicuna data clean` -> `ds-vicuna data split --max-length 512` -> an
identity-heavy subset -> fine-tune SmolLM2-135M-Instruct with ZeRO-3 + CPU offload on 2 CPU ranks through the
`deepspeed` launcher -> `ds-vicuna export` -> greedy answers to "Who are you?" before and after. The sample
teaches the name "Vicuna"; the demo exits non-zero when the fine-tuned answer does not say it.
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

QUESTION = "Who are you?"
IDENTITY = "Vicuna"
TEMPLATE = "vicuna_v1.1"
MAX_LENGTH = 512
DEMO_CONFIG = "demo"  # configs/demo.yaml, installed with the package (ds_vicuna.config.example_configs)


def sample_path() -> Path:
    """The bundled ShareGPT sample (identity Q&A plus general conversations)."""
    return Path(str(resources.files("ds_vicuna") / "data" / "sharegpt_sample.json"))


def prepare_data(out: Path, other: int, seed: int = 0) -> Path:
    """clean -> split -> train.jsonl: every identity conversation plus `other` general ones (a small, fast set)."""
    from ds_vicuna.cli import main as cli

    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    for argv in (["data", "clean", str(sample_path()), str(data / "clean.jsonl"), "--workers", "1", "--skip-bad"],
                 ["data", "split", str(data / "clean.jsonl"), str(data / "split.jsonl"), "--model", "embedded",
                  "--template", TEMPLATE, "--max-length", str(MAX_LENGTH)]):
        if cli(argv + ["--no-progress"]) != 0:
            raise SystemExit(f"ds-vicuna {' '.join(argv)} failed")
    records = [json.loads(line) for line in (data / "split.jsonl").read_text().splitlines() if line.strip()]
    identity = [r for r in records if IDENTITY in json.dumps(r)]
    general = [r for r in records if IDENTITY not in json.dumps(r)]
    random.Random(seed).shuffle(general)
    chosen = identity + general[:other]
    random.Random(seed).shuffle(chosen)
    train = data / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in chosen))
    print(f"[demo] {len(records)} conversations after clean+split; training on {len(identity)} identity + "
          f"{min(other, len(general))} general ones -> {train}", flush=True)
    return train


def launch_training(train: Path, out: Path, ranks: int, overrides: list[str]) -> Path:
    """Run `ds-vicuna train demo --ranks RANKS ...` (the deepspeed launcher); returns the output dir."""
    output_dir = out / "train"
    argv = ["--train_path", str(train), "--output_dir", str(output_dir), "--overwrite", "true", *overrides]
    command = [sys.executable, "-m", "ds_vicuna.cli", "train", DEMO_CONFIG, "--ranks", str(ranks), *argv]
    print("[demo] " + " ".join(command), flush=True)
    if subprocess.call(command) != 0:
        raise SystemExit("[demo] training failed (see above)")
    return output_dir


def answer(model_dir: Path, question: str = QUESTION, max_new_tokens: int = 48) -> str:
    """Greedy reply of the model in `model_dir`, prompted with the training template.

    Loaded and generated the way the serving worker does it (`ds_vicuna.model.loading`, `serve.generate`).
    """
    from ds_vicuna.model.loading import load_chat_model
    from ds_vicuna.serve.generate import generate_replies

    chat = load_chat_model(str(model_dir), template=TEMPLATE)
    reply = generate_replies(chat, [[{"role": "user", "content": question}]], max_new_tokens,
                             stop=["USER:"])[0]  # the base model runs on into the next turn
    if reply is None:
        raise SystemExit(f"[demo] generation failed for {model_dir}")
    return reply.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ds_vicuna.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/demo", help="everything the demo writes goes here")
    parser.add_argument("--ranks", type=int, default=2, help="CPU ranks (deepspeed launcher)")
    parser.add_argument("--general", type=int, default=8, help="general conversations mixed into the identity set")
    parser.add_argument("--smoke", action="store_true", help="one optimizer step, no identity check (tests)")
    parser.add_argument("overrides", nargs="*", help="extra trainer overrides, e.g. train.epochs=5")
    args = parser.parse_args(argv)
    from ds_vicuna.train.export import export_checkpoint
    from ds_vicuna.model.embedded import embedded_model_path

    started = time.time()
    out = Path(args.out)
    base = embedded_model_path()
    before = answer(base)
    print(f"[demo] before fine-tuning, {QUESTION!r} -> {before!r}", flush=True)
    train = prepare_data(out, other=4 if args.smoke else args.general)
    overrides = (["--max_steps", "1"] if args.smoke else []) + [
        o if o.startswith("--") else f"--{o}" for o in args.overrides]  # "train.epochs=5" -> "--train.epochs=5"
    output_dir = launch_training(train, out, args.ranks, overrides)
    exported = export_checkpoint(output_dir, out / "export")
    after = answer(exported)
    print(f"\n[demo] {QUESTION!r}\n  before: {before!r}\n  after:  {after!r}\n", flush=True)
    print(f"[demo] metrics: {output_dir / 'metrics.jsonl'}\n[demo] loss curve: {output_dir / 'loss.png'}\n"
          f"[demo] exported model: {exported}  (serve it: ds-vicuna serve all --model {exported})\n"
          f"[demo] took {time.time() - started:.0f} s", flush=True)
    if args.smoke:
        return 0
    if IDENTITY.lower() not in after.lower():
        print(f"[demo] FAILED: the fine-tuned model does not call itself {IDENTITY}", file=sys.stderr)
        return 1
    print(f"[demo] OK: the fine-tuned model learnt its new identity ({IDENTITY})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
