"""One rank of `bench_train.py`'s FastChat arm: runs FastChat's trainer and writes what the benchmark compares.

    PYTHONPATH=FASTCHAT_SRC deepspeed --num_gpus 2 benchmarks/bench_train_rank.py STATS_DIR FASTCHAT_SRC -- \
        --model_name_or_path ...

It runs FastChat's own `fastchat/train/train.py` from a checkout (nothing of it lives in this repo; the checkout
is on PYTHONPATH for its `fastchat` imports), with what it needs to run on a current transformers and on a
non-Llama tokenizer, applied at run time and printed (`FASTCHAT_PATCHES`), and writes STATS_DIR/rank<R>.json:
the rank's peak RSS when training starts (model loaded, engine built) and when it ends (before the final save),
the wall time at each optimizer step's end and the real (non-padding) tokens of each step. The ds-vicuna arm
needs no such script: the trainer writes the same peak RSS figures itself (`train.memory_report`).
"""
from __future__ import annotations

import json
import os
import sys
import time
import types
from pathlib import Path

from ds_vicuna.train.metrics import peak_rss_bytes  # the figure the trainer's memory_report writes

# (what, FastChat's text, replacement, how many times the text must occur).
FASTCHAT_PATCHES = [
    ("a tokenization mismatch keeps the sample's labels instead of masking the whole sample (FastChat's offsets "
     "are hard-coded for the Llama tokenizer; the compute per token is the same either way)",
     "                target[:] = IGNORE_TOKEN_ID\n", "                pass  # bench: keep the sample\n", 1),
    ("tokenizers without a `legacy` attribute (transformers 5, non-Llama) count as legacy",
     "not tokenizer.legacy", "not getattr(tokenizer, 'legacy', True)", 2),
]


def write_stats(stats_dir: str, stats: dict) -> None:
    rank = int(os.environ.get("RANK", "0"))
    Path(stats_dir, f"rank{rank}.json").write_text(json.dumps({"rank": rank, **stats}) + "\n")


def load_fastchat_train(source: Path) -> types.ModuleType:
    """FastChat's `fastchat/train/train.py` from a checkout, with FASTCHAT_PATCHES applied (its `fastchat`
    imports come from the checkout, which bench_train.py puts on PYTHONPATH)."""
    try:
        import transformers.modeling_attn_mask_utils  # noqa: F401
    except ImportError:  # gone in transformers 5; FastChat imports it for a CLLM generation helper only
        shim = types.ModuleType("transformers.modeling_attn_mask_utils")
        shim._prepare_4d_causal_attention_mask = None
        sys.modules[shim.__name__] = shim
    path = source / "fastchat" / "train" / "train.py"
    text = path.read_text()
    for what, old, new, times in FASTCHAT_PATCHES:
        if text.count(old) != times:
            raise SystemExit(f"{path}: expected {old.strip()!r} {times} time(s) ({what}); FastChat changed, "
                             "update the patch")
        text = text.replace(old, new)
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"[bench] patched FastChat's train.py: {what}", flush=True)
    module = types.ModuleType("fastchat_train_bench")
    module.__file__ = str(path)
    sys.modules[module.__name__] = module  # its dataclasses look their module up
    exec(compile(text, str(path), "exec"), module.__dict__)  # noqa: S102 - FastChat's own code, patched above
    return module


def let_hf_trainer_run_deepspeed_on_cpu() -> None:
    """HF Trainer + Accelerate know DeepSpeed on accelerators only: on a CPU-only machine Accelerate's backend probe
    finds none, so every rank would think it trains alone (world 1), and TrainingArguments refuses bf16 without
    a GPU. DeepSpeed's CPU accelerator runs both: report gloo/multi-CPU for a launched rank and allow bf16."""
    import torch
    import transformers.training_args
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    if torch.cuda.is_available():
        return
    probe = PartialState._prepare_backend

    def prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        if int(os.environ.get("LOCAL_RANK", -1)) != -1:
            return "gloo", DistributedType.MULTI_CPU
        return probe(self, cpu, sagemaker_dp, backend)

    PartialState._prepare_backend = prepare_backend
    transformers.training_args.is_torch_bf16_gpu_available = lambda *args, **kwargs: True


def run_fastchat(stats_dir: str, source: str, argv: list[str]) -> int:
    """FastChat's `train()` with its Trainer instrumented: step-end times, real tokens per step, peak RSS."""
    import transformers

    let_hf_trainer_run_deepspeed_on_cpu()
    module = load_fastchat_train(Path(source))
    stats = {"step_end_s": [], "step_tokens": []}
    tokens = [0]

    class StepClock(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            stats["peak_rss_before_training_bytes"] = peak_rss_bytes()

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if "param_dtype" not in stats:  # what the engine really computes in
                import torch

                stats["param_dtype"] = str(next(model.parameters()).dtype)

                def autocast_probe(module, args):
                    stats["autocast"] = (str(torch.get_autocast_dtype("cpu"))
                                         if torch.is_autocast_enabled("cpu") else "off")

                model.register_forward_pre_hook(autocast_probe)

        def on_step_end(self, args, state, control, **kwargs):
            stats["step_end_s"].append(time.perf_counter())
            stats["step_tokens"].append(tokens[0])
            tokens[0] = 0

        def on_train_end(self, args, state, control, **kwargs):
            stats["peak_rss_bytes"] = peak_rss_bytes()

    class TimedTrainer(module.Trainer):
        def __init__(self, *args, tokenizer=None, **kwargs):
            super().__init__(*args, processing_class=tokenizer, **kwargs)  # `tokenizer=` was renamed in transformers 5
            self.add_callback(StepClock())

        def training_step(self, model, inputs, *args, **kwargs):
            if "deepspeed_precision" not in stats:
                ds = self.accelerator.state.deepspeed_plugin.deepspeed_config
                stats["deepspeed_precision"] = {k: ds.get(k) for k in ("bf16", "fp16")}
                stats["mixed_precision"] = str(self.accelerator.mixed_precision)
            tokens[0] += int(inputs["attention_mask"].sum())
            return super().training_step(model, inputs, *args, **kwargs)

    module.Trainer = TimedTrainer
    sys.argv = [str(module.__file__), *argv]
    module.train()
    write_stats(stats_dir, stats)
    return 0


def main() -> int:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    cut = args.index("--")
    head, rest = args[:cut], args[cut + 1:]
    if len(head) != 2:
        raise SystemExit("usage: bench_train_rank.py STATS_DIR FASTCHAT_SRC -- FASTCHAT_TRAIN_ARGS...")
    return run_fastchat(head[0], head[1], rest)


if __name__ == "__main__":
    sys.exit(main())
