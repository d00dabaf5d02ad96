"""A new user's first hour: `pip install` (not editable) into a fresh environment, then work from an empty folder
of one's own with the README's commands.

    .venv/bin/python -m pytest tests/test_install.py -q

The package is built into a wheel from a copy of the source tree and installed with `--no-deps` into a new
virtualenv; a `.pth` file lends it this environment's site-packages for torch, transformers and deepspeed (the
dependencies, not ds_vicuna: the test checks that ds_vicuna, its DeepSpeed configs and examples come from the
wheel). Then, in an empty folder: `python -m ds_vicuna.demo --smoke` (clean, split, `ds-vicuna train demo`,
export) and a plain `ds-vicuna train` with the defaults (embedded model, bundled zero3_offload).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("setup.py", "ds_vicuna", "serve", "eval", "configs", "ds_configs")

pytestmark = pytest.mark.slow


def run(cmd: list, cwd: Path, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}\n{proc.stdout[-4000:]}\n" \
                                 f"{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """A fresh virtualenv with ds-vicuna installed from a wheel built out of a copy of the sources."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy2)(
            REPO / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if
                                        (REPO / name).is_dir() else {}))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", tmp / "dist",
         src], cwd=tmp, env=env)
    wheel = next((tmp / "dist").glob("ds_vicuna-*.whl"))
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp, env=env)
    python = venv / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps", "--no-index", wheel],
        cwd=tmp, env=env)
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp,
                    env=env).stdout.strip())
    (site / "zz_dev_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    work = tmp / "work"
    work.mkdir()
    env.update({"CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
                "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"})
    return {"venv": venv, "python": python, "work": work, "env": env, "wheel": wheel}


def test_the_wheel_holds_the_configs_and_they_resolve_from_the_install(installed):
    import zipfile

    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    for name in ("zero2", "zero3", "zero3_offload"):
        assert f"ds_vicuna/ds_configs/{name}.json" in names
    assert "ds_vicuna/configs/demo.yaml" in names
    probe = ("import ds_vicuna, ds_vicuna.config as c; print(ds_vicuna.__file__); "
             "print(c.deepspeed_config_path(c.Config().train.deepspeed)); print(c.config_file_path('demo'))")
    lines = run([installed["python"], "-c", probe], cwd=installed["work"], env=installed["env"]).stdout.split()
    venv = str(installed["venv"])
    assert all(line.startswith(venv) for line in lines), lines  # the wheel's files, not the source tree's
    assert lines[1].endswith("ds_vicuna/ds_configs/zero3_offload.json") and lines[2].endswith("configs/demo.yaml")


def test_the_readme_commands_work_from_an_empty_folder(installed):
    work, env = installed["work"], installed["env"]
    demo = run([installed["python"], "-m", "ds_vicuna.demo", "--smoke", "--ranks", "1", "--out", "demo"], cwd=work,
               env=env, timeout=900)
    assert (work / "demo" / "export" / "config.json").is_file(), demo.stdout[-3000:]
    assert "deepspeed: zero3_offload" in demo.stdout
    # the defaults: embedded model, bundled zero3_offload, vicuna_v1.1; outputs under the current folder
    plain = run([installed["venv"] / "bin" / "ds-vicuna", "train", "--data.train_path", "demo/data/train.jsonl",
                 "--train.max_steps", "1", "--train.global_batch_size", "2", "--train.micro_batch_size", "1",
                 "--data.max_length", "512"], cwd=work, env=env, timeout=900)
    assert (work / "runs" / "train" / "step-000001" / "hf" / "config.json").is_file(), plain.stdout[-3000:]
    assert "optimizer DeepSpeedCPUAdam (offload optimizer: cpu, params: cpu)" in plain.stdout
