"""ds-vicuna: ShareGPT conversations -> DeepSpeed ZeRO-3 fine-tuned chat model -> served -> judged.

Install (CPU box):  pip install torch==2.13.0 && pip install -e .[dev]
Install (GPU box):  pip install torch && pip install -e .[dev]
"""
from setuptools import find_packages, setup

# `serve/` and `eval/` live at the top of the repository (one folder per product stage) but are
# installed as `ds_vicuna.serve` and `ds_vicuna.eval`, so nothing called `eval` lands in site-packages.
# `ds_configs/` and `configs/` travel the same way, so `train.deepspeed: zero3_offload` and
# `ds-vicuna train demo` work in any install (ds_vicuna.config.bundled_deepspeed_configs, example_configs).
STAGE_FOLDERS = {"ds_vicuna.serve": "serve", "ds_vicuna.eval": "eval",
                 "ds_vicuna.ds_configs": "ds_configs", "ds_vicuna.configs": "configs"}

QLORA = ["bitsandbytes>=0.46"]  # model.quantization: the frozen base in 4 bits (CUDA, and the CPU since 0.46)

setup(
    name="ds-vicuna",
    version="0.1.0",
    description="Vicuna-style chat fine-tuning with DeepSpeed ZeRO-3: data, training, serving, evaluation",
    python_requires=">=3.10",
    packages=find_packages(include=["ds_vicuna", "ds_vicuna.*"]) + list(STAGE_FOLDERS),
    package_dir=STAGE_FOLDERS,
    package_data={"ds_vicuna": ["data/*.json", "data/*.jsonl", "data/*.txt"],
                  "ds_vicuna.serve": ["static/*"],
                  "ds_vicuna.ds_configs": ["*.json"],
                  "ds_vicuna.configs": ["*.yaml"],
                  "ds_vicuna.eval": ["questions/*.jsonl", "data/fastchat/*.jsonl", "data/fastchat/*/*.jsonl",
                                     "data/fastchat/*/*/*.jsonl", "data/fastchat/LICENSE",
                                     "data/fastchat/README.md"]},
    install_requires=[
        "torch>=2.1",
        "transformers>=4.56",
        "deepspeed>=0.15",
        "sentencepiece",
        "protobuf",
        "jsonlines",
        "flask>=3.0",
        "requests",
        "markdownify>=0.13",
        "langdetect",
        "tqdm",
        "pyyaml",
        "safetensors",
        "accelerate",
        "gguf",
        "matplotlib",
        "numpy",
        "waitress",
        "prometheus_client",
        "peft>=0.13",  # LoRA adapters: training (model.lora), export, serving many adapters over one base
    ],
    extras_require={
        # the suite trains QLoRA on the CPU too
        "dev": ["pytest", "pytest-timeout", "hypothesis", "openai", "selenium", "ruff", *QLORA],
        "qlora": QLORA,
        "flash": ["flash-attn>=2.5"],
        # lm-evaluation-harness against our server (tests/eval/test_lm_eval.py); heavy, so not in dev
        "harness": ["lm-eval[api]>=0.4.5"],
        # AlpacaEval's own length-controlled win rate, compared with eval/summarize.py's (tests/eval); test-only
        "alpaca": ["alpaca-eval>=0.6", "scikit-learn"],
    },
    entry_points={"console_scripts": ["ds-vicuna=ds_vicuna.cli:main"]},
)
