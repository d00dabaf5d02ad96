"""The GPU tier: every `gpu`-marked test, the training MFU benchmark and the loss-memory benchmark on one CUDA
machine with no network, in two commands of under 5 minutes each, and a report (markdown + JSON, device named).

    make gpu-wheels      # here, with the package index: .gpu_wheels/ (wheels + DeepSpeed sdist + SmolLM2 tokenizer)
    make gpu-test        # on the GPU machine (the repo with .gpu_wheels/): install once (a stamp), the gpu tests
    make gpu-bench       # on the GPU machine: install once, the benchmarks
    make gpu-check GPU_REPORT=/some/dir GPU_PY=/opt/torch/.venv/bin/python3     # both; the report folder
    make gpu-rehearsal   # here (CI runs it): the whole pipeline above on the CPU, as the GPU machine runs it

    python benchmarks/gpu_check.py wheels --out .gpu_wheels
    python3 benchmarks/gpu_check.py test --wheels .gpu_wheels --report-dir runs/gpu_check [--device cpu]
    python benchmarks/gpu_check.py rehearsal --report-dir runs/gpu_rehearsal

The GPU machine is assumed to hold CUDA torch, transformers, accelerate and the rest of the packages listed in
tests/gpu/image_packages.txt (Python 3.12), but none of deepspeed, flask, jsonlines, markdownify, ... `wheels` takes
the dependency closure of `ds-vicuna[dev]` from this checkout's .venv (the versions the CPU suite passed with), less
the image's packages and selenium (browser tests need Chromium, absent there), and downloads them as cp312
manylinux x86_64 or pure-Python wheels in one pip call; a package published only as a source archive is built into
a pure wheel here; DeepSpeed comes as its sdist (its ops are compiled just in time on the GPU machine). No model
weights travel: the GPU tests and benchmarks build random-weight models over the bundle's tokenizer
(`ds_vicuna.model.random_weights`, $DS_VICUNA_TOKENIZER).

`test` and `bench` make an overlay environment (.gpu_env/: its own site-packages first, then the machine's, so the
machine's torch is used and never reinstalled) and install the bundle with `pip install --no-index --no-deps`
(under `unshare -n` when root: no network at all), once per machine (a stamp keyed on the bundle's manifest); then
`test` runs `pytest -m gpu tests/` and `bench` the benchmarks, each phase within its budget (printed with the time
it took; SIGINT before the budget ends so pytest still writes its JUnit file, SIGKILL at it).

Never success without evidence (`verdict`): the exit code is 0 only when every test that can run on the machine
passed (skips whose reason opens with HARDWARE_SKIP, e.g. no flash-attn or one GPU, cannot), and it is non-zero when
no test was collected, every test skipped, a phase exited non-zero or ran past its budget, a benchmark wrote
nothing or an arm errored, the probe crashed (named as a probe crash) or no CUDA device is there (exit 3).
Only the standard library is used by `test`/`bench` until the overlay exists.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMAGE_PACKAGES = REPO / "tests" / "gpu" / "image_packages.txt"
MANIFEST = "bundle.json"
TOKENIZER_DIR = "tokenizer"
EXCLUDED = {"selenium": "browser tests need Chromium, which the GPU machine lacks; they skip without it"}
# Files of a bundled wheel left out: bitsandbytes (QLoRA's 4-bit kernels) ships one library per CUDA and ROCm version
# (41 MiB); the bundle keeps the CPU one and CUDA 12.6-13.x (the image's torch is a CUDA 13 build).
SLIM_DROP = {"bitsandbytes": re.compile(r"^bitsandbytes/libbitsandbytes_(?!cpu\.|cuda12[68]\.|cuda13\d\.)[^/]+\.so$")}
GPU_PYTHON = "3.12"
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in range(39, 16, -1)] + ["manylinux2014_x86_64", "manylinux1_x86_64"]
MAX_BUNDLE_MIB = 48  # the whole working tree travels in 64 MiB
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
# Each command (`make gpu-test`, `make gpu-bench`) fits one 5-minute device command with its install: the phase
# budgets of one command add up to COMMAND_LIMIT_S at most (tests/gpu/test_gpu_check.py checks it).
BUDGETS_S = {"install": 75, "probe": 25, "tests": 180, "loss_memory": 35, "bench_train": 145}
COMMAND_PHASES = {"test": ("install", "probe", "tests"), "bench": ("install", "probe", "loss_memory", "bench_train")}
COMMAND_LIMIT_S = 285
# The rehearsal (device cpu) runs the same phases on a 2-core CPU (CI runs it after `make test`): quiet, the tests
# take ~130 s (DeepSpeed's CPU Adam built just in time included) and bench_train ~60 s; 4-5x that is allowed
# for a loaded machine, and a rehearsal past it fails as a GPU run past its budget would.
REHEARSAL_BUDGETS_S = {"install": 300, "probe": 60, "tests": 600, "loss_memory": 120, "bench_train": 300}
GRACE_S = 15  # SIGINT this long before a phase's budget ends, SIGKILL at the end
NO_GPU_EXIT = 3
STAMP = ".ds_vicuna_installed"
CPU_TORCH = "2.13.0"  # the local CPU build of torch (a CUDA torch spec would pull CUDA wheels)
# a skip reason opening with this: "this machine cannot run it" (tests/support/gpu_device.py holds the same)
HARDWARE_SKIP = "not on this machine:"


def canonical(name: str) -> str:
    """PEP 503 name: lower case, runs of -_. as one dash."""
    return re.sub(r"[-_.]+", "-", name).lower()


def image_packages(path: Path = IMAGE_PACKAGES) -> set[str]:
    """Canonical names of the packages the GPU image already holds (one per line, `#` comments)."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return {canonical(line.split("==")[0]) for line in lines if line}


# ------------------------------------------------------------------------------------------------------- wheels


def bundle_requirements(image: set[str], root: str = "ds-vicuna", extras: tuple[str, ...] = ("dev",)) -> dict:
    """{canonical name: installed version} of every distribution `root[extras]` needs (transitively, markers
    evaluated for this interpreter) that the image lacks, read from the installed metadata (this .venv).

    Raises:
        RuntimeError: a needed distribution is not installed here (run `make env` first).
    """
    import importlib.metadata as metadata

    from packaging.requirements import Requirement

    needed, stack = {}, [(root, extras)]
    while stack:
        name, wanted_extras = stack.pop()
        for text in metadata.distribution(name).requires or []:
            req = Requirement(text)
            if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in ("", *wanted_extras)):
                continue
            key = canonical(req.name)
            if key in needed or key in image or key in EXCLUDED:
                continue
            try:
                needed[key] = metadata.version(key)
            except metadata.PackageNotFoundError:
                raise RuntimeError(f"{req} (needed by {name}) is not installed in {sys.prefix}; "
                                   "run `make env`") from None
            stack.append((key, tuple(req.extras)))
    return dict(sorted(needed.items()))


def _pip(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], capture_output=True,
                          text=True, **kwargs)


def _platform_args() -> list[str]:
    return ["--only-binary=:all:", "--python-version", GPU_PYTHON, "--implementation", "cp", "--abi", "cp312",
            "--abi", "abi3", "--abi", "none", *[arg for p in PLATFORMS for arg in ("--platform", p)]]


def fetch_one(name: str, version: str, out: Path) -> str:
    """Put `name==version` into `out` as a wheel for cp312 manylinux x86_64 (or pure Python); DeepSpeed as its
    sdist. Returns how it was obtained. Raises RuntimeError naming the package when nothing fits."""
    spec = f"{name}=={version}"
    if name == "deepspeed":  # its metadata step imports torch: this venv's, no isolated build environment
        proc = _pip("download", "--no-deps", "--no-binary=:all:", "--no-build-isolation", "-d", str(out), spec,
                    env=dict(os.environ, DS_BUILD_OPS="0"))
        how = "sdist (ops built just in time on the GPU machine)"
    else:
        proc = _pip("download", "--no-deps", *_platform_args(), "-d", str(out), spec)
        how = "wheel"
        if proc.returncode != 0:  # published as a source archive only: build it here, it must come out pure
            proc = _pip("wheel", "--no-deps", "--no-build-isolation", "--no-binary", name, "-w", str(out), spec)
            how = "built here from its sdist"
    if proc.returncode != 0:
        raise RuntimeError(f"{spec}: cannot fetch it for Python {GPU_PYTHON} x86_64:\n{proc.stderr[-2000:]}")
    return how


def fetch_wheels(needed: dict, out: Path) -> dict:
    """Download every wheel of `needed` ({name: version}, DeepSpeed aside) in one pip call, dropping and
    retrying without each spec pip names as having no fitting wheel (a bounded loop); those, and DeepSpeed, then
    one at a time (`fetch_one`). Returns {name: how it was obtained}."""
    batch = {name: version for name, version in needed.items() if name != "deepspeed"}
    alone: list[str] = [name for name in needed if name == "deepspeed"]
    for _ in range(len(batch) + 1):
        if not batch:
            break
        proc = _pip("download", "--no-deps", *_platform_args(), "-d", str(out),
                    *[f"{name}=={version}" for name, version in batch.items()])
        if proc.returncode == 0:
            break
        missing = re.findall(r"(?:No matching distribution found for|Could not find a version that satisfies the "
                             r"requirement) ([A-Za-z0-9._-]+)==", proc.stderr)
        names = {canonical(m) for m in missing} & batch.keys()
        if not names:
            raise RuntimeError(f"pip download of the bundle failed:\n{proc.stderr[-3000:]}")
        for name in names:
            alone.append(name)
            del batch[name]
    how = {name: "wheel" for name in batch}
    for name in alone:
        how[name] = fetch_one(name, needed[name], out)
    return how


def bundle_file(name: str, files: list[str]) -> str:
    """The one file of `files` that holds distribution `name`.

    Raises:
        RuntimeError: none or several, naming the package.
    """
    found = [f for f in files if canonical(re.split(r"-\d", f, maxsplit=1)[0]) == name]
    if len(found) != 1:
        raise RuntimeError(f"{name}: the bundle holds {found or 'no file'}, not one file")
    return found[0]


def wheel_fits_gpu_python(filename: str) -> bool:
    """True for a wheel that installs on CPython 3.12 manylinux x86_64 (pure, abi3, cp312, or py3-none built for
    manylinux x86_64: an executable in a wheel)."""
    if filename.endswith(".tar.gz"):
        return filename.startswith("deepspeed-")
    parts = filename[:-len(".whl")].split("-")
    python_tag, abi_tag, platform_tag = parts[-3:]
    py3 = any(t.startswith("py3") for t in python_tag.split("."))
    pure = platform_tag == "any" and abi_tag == "none" and py3
    native = ("cp312" in python_tag.split(".") or abi_tag == "abi3" or (abi_tag == "none" and py3)) \
        and "x86_64" in platform_tag and platform_tag.startswith(("manylinux", "linux"))  # py3-none: an executable
    return pure or native


def slim_wheel(path: Path, drop: re.Pattern) -> list[str]:
    """Rewrite the wheel at `path` without the members whose name `drop` matches (and without their RECORD lines,
    so pip installs it as a whole wheel). Returns the names left out.

    Raises:
        RuntimeError: nothing matched (the package's layout changed: the pattern needs a look).
    """
    import zipfile

    with zipfile.ZipFile(path) as source:
        members = source.infolist()
        dropped = [m.filename for m in members if drop.search(m.filename)]
        if not dropped:
            raise RuntimeError(f"{path.name}: no member matches {drop.pattern}; look at the wheel's layout")
        slim = path.with_suffix(".slim")
        with zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as target:
            for member in members:
                if member.filename in dropped:
                    continue
                data = source.read(member)
                if member.filename.endswith(".dist-info/RECORD"):
                    lines = data.decode().splitlines(keepends=True)
                    data = "".join(line for line in lines if line.split(",", 1)[0] not in dropped).encode()
                target.writestr(member, data)
    slim.replace(path)
    return dropped


def copy_tokenizer(out: Path) -> Path:
    """The embedded model's (SmolLM2) tokenizer files only, for the GPU benchmark (no weights travel)."""
    from ds_vicuna.model.embedded import embedded_model_path

    source, target = embedded_model_path(), out / TOKENIZER_DIR
    target.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
    return target


def build_bundle(out: Path) -> dict:
    """`make gpu-wheels`: a fresh `out` with every wheel the GPU image lacks, the tokenizer and a manifest."""
    needed = bundle_requirements(image_packages())
    if out.exists():
        shutil.rmtree(out)  # two versions of one package would stop the whole install
    out.mkdir(parents=True)
    how = fetch_wheels(needed, out)
    present = sorted(os.listdir(out))
    files = []
    for name, version in needed.items():
        file = bundle_file(name, present)
        if not wheel_fits_gpu_python(file):
            raise RuntimeError(f"{name}=={version}: got {file}, not a file that installs on CPython {GPU_PYTHON} "
                               "x86_64")
        if name in SLIM_DROP:
            dropped = slim_wheel(out / file, SLIM_DROP[name])
            how[name] += f", slimmed: {len(dropped)} libraries left out ({dropped[0]}, ...)"
        files.append({"name": name, "version": version, "file": file, "how": how[name]})
        print(f"[gpu-wheels] {name}=={version}: {file} ({how[name]})", flush=True)
    copy_tokenizer(out)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    manifest = {"python": GPU_PYTHON, "platforms": PLATFORMS[:1] + ["..."] + PLATFORMS[-2:],
                "image_packages": str(IMAGE_PACKAGES.relative_to(REPO)), "excluded": EXCLUDED, "files": files,
                "tokenizer": TOKENIZER_DIR, "bytes": size}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if size > MAX_BUNDLE_MIB * 2**20:
        raise RuntimeError(f"{out} holds {size / 2**20:.1f} MiB, over {MAX_BUNDLE_MIB} MiB: it cannot travel")
    print(f"[gpu-wheels] {len(files)} packages + tokenizer in {out} ({size / 2**20:.1f} MiB); carry it with the "
          "repo to the GPU machine and run `make gpu-check` there", flush=True)
    return manifest


# -------------------------------------------------------------------------------------------------------- check


def manifest_digest(wheels: Path) -> str:
    """sha256 of the bundle's manifest: what the install stamp records."""
    return hashlib.sha256((wheels / MANIFEST).read_bytes()).hexdigest()


def make_overlay(base_python: str, env_dir: Path) -> Path:
    """A venv whose own site-packages come first and the base interpreter's (its torch, transformers) after.

    Returns the overlay's python.
    """
    if env_dir.exists():
        shutil.rmtree(env_dir)
    subprocess.run([base_python, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    probe = ("import json, site, sysconfig; "
             "print(json.dumps(site.getsitepackages() + [sysconfig.get_paths()['purelib']]))")
    base_sites = list(dict.fromkeys(json.loads(subprocess.run([base_python, "-c", probe], check=True,
                                                              capture_output=True, text=True).stdout)))
    own_site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              check=True, capture_output=True, text=True).stdout.strip()
    # addsitedir also runs the base's own .pth files; the overlay's packages stay first on sys.path
    lines = [f"import site; site.addsitedir({path!r})" for path in base_sites if Path(path).is_dir()]
    Path(own_site, "ds_vicuna_gpu_base.pth").write_text("\n".join(lines) + "\n")
    return python


def offline_prefix() -> list[str]:
    """`unshare -n` (a network namespace with no interfaces) when this process may create one (root), else []:
    the no-index flags and offline variables are then the only guard."""
    if os.geteuid() == 0 and shutil.which("unshare"):
        if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0:
            return ["unshare", "-n"]
    return []


def install_bundle(python: Path, wheels: Path, log: list, budget_s: float, offline: list[str] = ()) -> None:
    """pip install --no-index --no-deps of the bundle, then this checkout (editable), into the overlay, with no
    network: `offline` (e.g. `unshare -n`) runs before pip, and the index is off in flags and variables."""
    manifest = json.loads((wheels / MANIFEST).read_text())
    files = [str(wheels / f["file"]) for f in manifest["files"]]
    env = dict(os.environ, DS_BUILD_OPS="0", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", HF_HUB_OFFLINE="1")
    env.pop("PIP_FIND_LINKS", None)
    env.pop("PIP_CONSTRAINT", None)
    env["PIP_CONFIG_FILE"] = os.devnull  # this machine's pip settings (indexes, constraints) play no part
    deadline = time.monotonic() + budget_s
    for step in (files, ["-e", str(REPO)]):
        command = [*offline, str(python), "-m", "pip", "install", "--no-index", "--no-deps", "--no-build-isolation",
                   "--use-pep517", "--no-cache-dir", "--find-links", str(wheels), *step]
        proc = subprocess.run(command, capture_output=True, text=True, env=env,
                              timeout=max(1.0, deadline - time.monotonic()))
        log.append({"command": " ".join(command[:len(offline) + 6]) + " ...", "rc": proc.returncode,
                    "output": (proc.stdout + proc.stderr)[-3000:]})
        if proc.returncode != 0:
            raise RuntimeError(f"install failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


def ensure_installed(base_python: str, wheels: Path, env_dir: Path, offline: list[str],
                     budgets: dict = BUDGETS_S) -> tuple[Path, dict]:
    """The overlay with the bundle installed, once per machine: a stamp (the manifest's digest and the base
    interpreter) skips the install when nothing changed. Returns (its python, the install phase record)."""
    started = time.monotonic()
    python, stamp = env_dir / "bin" / "python", env_dir / STAMP
    want = {"manifest": manifest_digest(wheels), "base_python": base_python, "repo": str(REPO)}
    if python.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == want:
        record = phase_record("install", 0, started, False, budgets["install"], note=f"already installed ({stamp})")
        return python, record
    log: list = []
    try:
        python = make_overlay(base_python, env_dir)
        install_bundle(python, wheels, log, budgets["install"], offline)
    except subprocess.TimeoutExpired:
        raise PhaseError(phase_record("install", None, started, True, budgets["install"], log=log)) from None
    except (RuntimeError, subprocess.SubprocessError, OSError) as err:
        raise PhaseError(phase_record("install", 1, started, False, budgets["install"], note=str(err)[-3000:],
                                      log=log)) from None
    stamp.write_text(json.dumps(want) + "\n")
    offline_note = " ".join(offline) or "no-index flags only (not root: no network namespace)"
    return python, phase_record("install", 0, started, False, budgets["install"],
                                note=f"installed offline ({offline_note})", log=log)


class PhaseError(Exception):
    """A phase that stops the command (install): carries its record."""

    def __init__(self, record: dict):
        super().__init__(record.get("note") or record["phase"])
        self.record = record


ENV_PROBE = r"""
import json, platform, importlib.metadata as md
info = {"python": platform.python_version()}
for name in ("torch", "transformers", "deepspeed", "accelerate", "peft", "bitsandbytes", "flash-attn", "triton"):
    try:
        info[name] = md.version(name)
    except md.PackageNotFoundError:
        info[name] = None
import torch
info["cuda_available"] = torch.cuda.is_available()
info["cuda"] = torch.version.cuda
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    info["device"] = torch.cuda.get_device_name(0)
    info["device_count"] = torch.cuda.device_count()
    info["memory_gib"] = round(props.total_memory / 2**30, 1)
    info["bf16"] = torch.cuda.is_bf16_supported()
try:
    import deepspeed
    info["deepspeed_accelerator"] = deepspeed.get_accelerator().device_name()
except Exception as err:  # the tests will show it too; the report should still name the device
    info["deepspeed_error"] = f"{type(err).__name__}: {err}"[:500]
print(json.dumps(info))
"""


def probe_environment(python: Path, budget_s: float | None = None) -> dict:
    """Versions, the device and its memory, from `python`; {"probe_crash": why} when the probe itself fails (a
    crash is not "no CUDA device": the report and the exit code say which)."""
    try:
        proc = subprocess.run([str(python), "-c", ENV_PROBE], capture_output=True, text=True,
                              timeout=budget_s or BUDGETS_S["probe"])
    except subprocess.TimeoutExpired:
        return {"probe_crash": f"the environment probe ran past {budget_s or BUDGETS_S['probe']} s"}
    except OSError as err:
        return {"probe_crash": f"{type(err).__name__}: {err}"}
    if proc.returncode != 0:
        return {"probe_crash": f"exit {proc.returncode}: {proc.stderr.strip()[-2000:]}"}
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"probe_crash": f"unreadable output: {proc.stdout[-500:]!r}"}


def phase_record(name: str, rc: int | None, started: float, timed_out: bool, budget_s: float | None = None,
                 **extra) -> dict:
    """{phase, rc, seconds, budget_s, timed_out, ...}, printed with its budget and the time it took."""
    seconds = round(time.monotonic() - started, 1)
    budget = budget_s or BUDGETS_S[name]
    record = {"phase": name, "rc": rc, "seconds": seconds, "budget_s": budget, "timed_out": timed_out, **extra}
    state = "TIMED OUT" if timed_out else f"rc {rc}"
    print(f"[gpu-check] {name}: {state}, {seconds} s of its {budget} s budget"
          + (f"; {extra['note']}" if extra.get("note") else ""), flush=True)
    return record


def run_phase(name: str, command: list, log_path: Path, env: dict, budget_s: float | None = None) -> dict:
    """Run one phase within its time budget, output to `log_path`. Past the budget less GRACE_S the process
    group gets SIGINT (pytest then still writes its JUnit file; the benchmarks their JSON), at the budget SIGKILL
    (the trainers it started hold the GPU). Returns the phase record."""
    budget = budget_s or BUDGETS_S[name]
    started = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(c) for c in command], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                start_new_session=True, preexec_fn=_default_sigint)
        timed_out = False
        try:
            rc = proc.wait(timeout=max(1.0, budget - GRACE_S))
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc = None
        _kill_group(proc.pid)  # whatever it left behind
    return phase_record(name, rc, started, timed_out, budget, log=log_path.name)


def _default_sigint() -> None:
    """In the phase's child: SIGINT back to its default (a shell that ran us in the background ignored it), so
    Python raises KeyboardInterrupt there and pytest ends the session cleanly."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def gpu_test_files(root: Path = REPO / "tests") -> list[str]:
    """The test modules that hold `gpu` tests (their text names `pytest.mark.gpu`), relative to the repo: what
    the tests phase runs, so a module elsewhere that skips as a whole (an optional extra) is not in the count,
    and one of these that does is."""
    return sorted(str(path.relative_to(REPO)) for path in root.rglob("test_*.py") if "pytest.mark.gpu" in
                  path.read_text())


def phase_env(wheels: Path, report_dir: Path, device: str) -> dict:
    """The environment of the tests and benchmarks: the bundle's tokenizer, no hub, no embedded-model cache (the
    GPU machine has none), the device the `gpu` tests run on."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               DS_VICUNA_TOKENIZER=str((wheels / TOKENIZER_DIR).resolve()),
               DS_VICUNA_CACHE=str((report_dir / "ds_vicuna_cache").resolve()),
               DS_VICUNA_GPU_TEST_DEVICE=device)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
    return env


def bench_commands(device: str, wheels: Path, report_dir: Path) -> list[tuple[str, Path, list]]:
    """(phase, JSON path, command) of each benchmark: full size on CUDA, tiny shapes and a step or two on CPU."""
    loss_json, train_json = report_dir / "loss_memory.json", report_dir / "bench_train.json"
    train = ["benchmarks/bench_gpu_train.py", "--tokenizer", wheels / TOKENIZER_DIR, "--work-dir",
             report_dir / "bench_train_work", "--json", train_json]
    if device == "cuda":
        return [("loss_memory", loss_json, ["benchmarks/bench_loss_memory.py", "--device", "cuda",
                                            "--json", loss_json]),
                ("bench_train", train_json, train)]
    return [("loss_memory", loss_json, ["benchmarks/bench_loss_memory.py", "--device", "cpu", "--tokens", "512",
                                        "--hidden", "64", "--json", loss_json]),
            ("bench_train", train_json, [*train, "--tiny", "--steps", "2", "--offload-steps", "2", "--warmup", "1",
                                         "--conversations", "40", "--tokens-per-step", "8192",
                                         "--micro-tokens", "4096"])]


def run_command(command: str, wheels: Path, report_dir: Path, base_python: str, env_dir: Path,
                device: str = "cuda", offline: list[str] | None = None) -> int:
    """`make gpu-test` (command "test": install once, probe, the gpu tests) or `make gpu-bench` ("bench": install
    once, probe, the benchmarks). Writes `<command>.json` and the merged report. Returns 0 only with evidence:
    see `verdict`."""
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / f"{command}.json").unlink(missing_ok=True)
    started = time.monotonic()
    report = {"command": command, "device_asked": device, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "host": platform.node(), "phases": []}
    budgets = BUDGETS_S if device == "cuda" else REHEARSAL_BUDGETS_S
    print(f"[gpu-check] {command} on {device}: phases {', '.join(COMMAND_PHASES[command])}, budgets "
          f"{sum(budgets[p] for p in COMMAND_PHASES[command])} s in all", flush=True)
    try:
        python, record = ensure_installed(base_python, wheels, env_dir, offline_prefix() if offline is None
                                          else offline, budgets)
    except PhaseError as err:
        report["phases"].append(err.record)
        report["error"] = f"install: {err}"
        return finish(report, report_dir, started, device)
    report["phases"].append(record)
    probe_started = time.monotonic()
    report["environment"] = probe_environment(python, budgets["probe"])
    report["phases"].append(phase_record("probe", 1 if "probe_crash" in report["environment"] else 0,
                                         probe_started, False, budgets["probe"]))
    if "probe_crash" in report["environment"] or (device == "cuda" and not report["environment"].get(
            "cuda_available")):
        return finish(report, report_dir, started, device)
    write_report(report_dir, report)  # after every phase: a run cut short still leaves its report
    env = phase_env(wheels, report_dir, device)
    if command == "test":
        junit = report_dir / "junit.xml"
        junit.unlink(missing_ok=True)
        report["phases"].append(run_phase("tests", [
            python, "-m", "pytest", "-m", "gpu", "-ra", "--durations=15", "-p", "no:cacheprovider",
            f"--junitxml={junit}", f"--timeout={int(budgets['tests'] - GRACE_S)}", *gpu_test_files()],
            report_dir / "tests.log", env, budgets["tests"]))
        report["tests"] = read_junit(junit) if junit.is_file() else []
    else:
        for key, path, bench in bench_commands(device, wheels, report_dir):
            path.unlink(missing_ok=True)
            report["phases"].append(run_phase(key, [python, *bench], report_dir / f"{key}.log", env, budgets[key]))
            report[key] = json.loads(path.read_text()) if path.is_file() else None
            write_report(report_dir, report)
    return finish(report, report_dir, started, device)


def finish(report: dict, report_dir: Path, started: float, device: str) -> int:
    """Write the report with its verdict; print each problem. Returns 0 (evidence of success), NO_GPU_EXIT (no
    CUDA device where one was asked for) or 1."""
    report["seconds"] = round(time.monotonic() - started, 1)
    report["problems"] = verdict(report, device)
    write_report(report_dir, report)
    limit = f"limit {COMMAND_LIMIT_S} s on the GPU" if device == "cuda" else "CPU rehearsal: no limit but its budgets"
    print(f"[gpu-check] {report['command']}: {report['seconds']} s in all ({limit}); report "
          f"{report_dir / 'report.md'}", flush=True)
    for problem in report["problems"]:
        print(f"[gpu-check] FAILED: {problem}", file=sys.stderr, flush=True)
    if not report["problems"]:
        return 0
    env = report.get("environment") or {}
    no_gpu = device == "cuda" and env and "probe_crash" not in env and not env.get("cuda_available")
    return NO_GPU_EXIT if no_gpu else 1


def verdict(report: dict, device: str) -> list[str]:
    """Why this run proves nothing or failed (empty: success with evidence): install or probe crash, no CUDA
    device, a phase that exited non-zero or ran past its budget, no test collected, every test skipped, fewer
    passed than the tests that can run here (skips whose reason opens with HARDWARE_SKIP cannot), a benchmark
    that wrote nothing or an arm that errored."""
    problems = []
    env = report.get("environment")
    if report.get("error"):
        problems.append(report["error"].splitlines()[0][:300])
    if env and "probe_crash" in env:
        lines = env["probe_crash"].strip().splitlines() or ["?"]
        problems.append(f"probe crash: {lines[-1][:300]}")
    elif env is not None and device == "cuda" and not env.get("cuda_available"):
        problems.append("no CUDA device here (the probe ran: torch.cuda.is_available() is False)")
    for phase in report.get("phases", []):
        if phase["timed_out"]:
            problems.append(f"phase {phase['phase']} ran past its {phase['budget_s']} s budget")
        elif phase["rc"] not in (0, None) and phase["phase"] not in ("install", "probe"):
            meaning = {5: " (pytest collected no tests)", 2: " (interrupted)"}.get(phase["rc"], "") \
                if phase["phase"] == "tests" else ""
            problems.append(f"phase {phase['phase']} exited {phase['rc']}{meaning}")
    ran = {p["phase"] for p in report.get("phases", [])}
    if "tests" in ran:
        problems += test_problems(report.get("tests") or [])
    for key in ("loss_memory", "bench_train"):
        if key not in ran:
            continue
        result = report.get(key)
        if not result:
            problems.append(f"{key}: no results written")
            continue
        if result.get("skipped"):
            problems.append(f"{key}: measured nothing ({result['skipped']})")
        arms = result.get("arms") or []
        if not [arm for arm in arms if not arm.get("skipped")]:
            problems.append(f"{key}: no arm ran")
        for arm in arms:
            name = arm.get("arm", arm.get("loss", "?"))
            if arm.get("error"):
                problems.append(f"{key} arm {name}: {arm['error'][:200]}")
            elif arm.get("skipped") and not arm["skipped"].startswith(HARDWARE_SKIP):
                problems.append(f"{key} arm {name} skipped: {arm['skipped'][:200]}")
    return problems


def test_problems(tests: list[dict]) -> list[str]:
    """The tests' part of the verdict (see `verdict`)."""
    if not tests:
        return ["no test collected (or none reported)"]
    runnable = [t for t in tests if not (t["outcome"] == "skipped" and t["message"].startswith(HARDWARE_SKIP))]
    passed = [t for t in runnable if t["outcome"] == "passed"]
    problems = []
    if all(t["outcome"] == "skipped" for t in tests):
        problems.append(f"every test skipped ({len(tests)}): nothing was proven")
    if len(passed) < len(runnable):
        others = [f"{t['name']} ({t['outcome']})" for t in runnable if t["outcome"] != "passed"]
        problems.append(f"{len(passed)} of the {len(runnable)} tests that can run here passed; not passed: "
                        + ", ".join(others[:8]) + (" ..." if len(others) > 8 else ""))
    return problems


# ------------------------------------------------------------------------------------------------------- report


def read_junit(path: Path) -> list[dict]:
    """[{name, outcome (passed/failed/error/skipped), seconds, message}] from pytest's JUnit XML (a test cut short
    by the phase budget is an error)."""
    tests = []
    for case in ET.parse(path).getroot().iter("testcase"):
        if case.get("name") is None:  # what pytest writes for the test a KeyboardInterrupt stopped
            tests.append({"name": "(the test running at the budget)", "outcome": "error", "seconds": 0.0,
                          "message": "interrupted at the phase budget"})
            continue
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                message = (node.get("message") or node.text or "").strip()
                break
        name = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
        tests.append({"name": name, "outcome": outcome, "seconds": float(case.get("time") or 0),
                      "message": message[:400]})
    return tests


def write_report(report_dir: Path, report: dict) -> tuple[Path, Path]:
    """`<command>.json` (this command's run), then report.json (the test and bench runs found in `report_dir`) and
    report.md (what a person reads first) from them."""
    (report_dir / f"{report.get('command', 'check')}.json").write_text(json.dumps(report, indent=2, default=str)
                                                                       + "\n")
    runs = [json.loads(path.read_text()) for name in ("test", "bench", "check")
            if (path := report_dir / f"{name}.json").is_file()]
    json_path, md_path = report_dir / "report.json", report_dir / "report.md"
    json_path.write_text(json.dumps({"runs": runs}, indent=2, default=str) + "\n")
    md_path.write_text("\n".join(render_markdown(run) for run in runs))
    return md_path, json_path


def render_markdown(report: dict) -> str:
    """One command's run as markdown: device and versions, the verdict, tests, benchmark tables, phases."""
    env = report.get("environment") or {}
    if "probe_crash" in env:
        device = "probe crash"
    else:
        device = env.get("device") or ("no CUDA device" if env else "unknown (install failed)")
    tests = report.get("tests", [])
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "error", "skipped")}
    versions = ", ".join(f"{name} {env.get(name)}" for name in ("torch", "cuda", "transformers", "deepspeed", "python")
                         if env.get(name))
    memory = f", {env['memory_gib']} GiB" if env.get("memory_gib") else ""
    lines = [f"# ds-vicuna GPU check ({report.get('command', 'check')}, device {report.get('device_asked', 'cuda')}):"
             f" {device}", "",
             f"{report.get('started', '')} on {report.get('host', '')}, {report.get('seconds', '?')} s in all "
             f"(limit {COMMAND_LIMIT_S} s); {versions}{memory}.", ""]
    if "probe_crash" in env:
        lines += ["**Probe crash:** " + (env["probe_crash"].strip().splitlines() or ["?"])[-1][:300], ""]
    if report.get("error"):
        lines += ["**Stopped:** " + report["error"].splitlines()[0], ""]
    if "problems" in report:
        lines += ["**Verdict: " + ("passed, with evidence**" if not report["problems"] else "FAILED**"), ""]
        lines += [f"- {problem}" for problem in report["problems"]] + ([""] if report["problems"] else [])
    if "tests" in report:
        lines += [f"**gpu tests: {counts['passed']} passed, {counts['failed']} failed, {counts['error']} errors, "
                  f"{counts['skipped']} skipped**", ""]
    if tests:
        lines += ["| test | outcome | s | note |", "|---|---|---:|---|"]
        for t in tests:
            note = t["message"].splitlines()[0][:160].replace("|", "/") if t["message"] else ""
            lines.append(f"| `{t['name']}` | {t['outcome']} | {t['seconds']:.1f} | {note} |")
        lines.append("")
    bench = report.get("bench_train")
    if bench and bench.get("arms"):
        lines += [f"## Training throughput ({bench.get('model', '')}, {bench.get('device', '')})", "",
                  "| max length | ZeRO config | attention | steps timed | real tokens/s/GPU | MFU | peak GiB | note |",
                  "|---:|---|---|---:|---:|---:|---:|---|"]
        for arm in bench["arms"]:
            mfu = f"{100 * arm['mfu']:.1f}%" if arm.get("mfu") is not None else "-"
            tok = f"{arm['tokens_per_s']:.0f}" if arm.get("tokens_per_s") else "-"
            mem = f"{arm['peak_gib']:.1f}" if arm.get("peak_gib") else "-"
            lines.append(f"| {arm['max_length']} | {arm['deepspeed']} | {arm['attn']} | {arm.get('steps_timed', 0)} "
                         f"| {tok} | {mfu} | {mem} | {(arm.get('error') or arm.get('skipped') or '')[:120]} |")
        lines.append("")
    loss = report.get("loss_memory")
    if loss and loss.get("arms"):
        lines += [f"## Loss peak memory ({loss.get('shape', '')})", "", "| loss | peak MiB above the model |",
                  "|---|---:|"]
        lines += [f"| {a['loss']} | {a['peak_mib']:.0f} |" for a in loss["arms"]]
        lines.append("")
    if report.get("phases"):
        lines += ["## Phases", "", "| phase | exit | s | budget s | log / note |", "|---|---:|---:|---:|---|"]
        lines += [f"| {p['phase']} | {'timeout' if p['timed_out'] else p['rc']} | {p['seconds']} | {p['budget_s']} "
                  f"| {phase_log_cell(p)} |" for p in report["phases"]]
        lines.append("")
    return "\n".join(lines)


def phase_log_cell(phase: dict) -> str:
    """The report table's "log / note" cell: the log file's name, or for the install (a list of pip runs) each
    run's exit code (report.json keeps their output), else the note's start."""
    log = phase.get("log")
    if isinstance(log, list):
        return "; ".join(f"pip install rc {run.get('rc')}" for run in log) + " (output in report.json)"
    return str(log or (phase.get("note") or "")[:100]).replace("|", "/").replace("\n", " ")


# ---------------------------------------------------------------------------------------------------- rehearsal


def image_pins(path: Path = IMAGE_PACKAGES) -> dict:
    """{canonical name: version} for the lines of image_packages.txt that pin one (`name==version`)."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return {canonical(line.split("==")[0]): line.split("==")[1].strip() for line in lines if "==" in line}


def image_env_requirements() -> list[str]:
    """What the rehearsal's stand-in for the GPU image is built from: every package `ds-vicuna[dev]` needs that the
    image has, at the image's version where image_packages.txt pins one (pip picks the rest to fit them); torch is
    CPU torch 2.13.0 (the local CPU build) standing in for the image's CUDA torch."""
    image, pins = image_packages(), image_pins()
    wanted = sorted(name for name in bundle_requirements(set()) if name in image and name != "torch")
    return [f"{name}=={pins[name]}" if name in pins else name for name in wanted] + [f"torch=={CPU_TORCH}"]


def make_image_env(env_dir: Path) -> str:
    """A venv holding only the GPU image's packages (`image_env_requirements` with what they need; anything pip
    adds that the image lacks is removed again), built with the package index once (a stamp holds the
    requirement list). Returns its python."""
    python, stamp = env_dir / "bin" / "python", env_dir / STAMP
    requirements = image_env_requirements()
    if python.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == requirements:
        return str(python)
    if env_dir.exists():
        shutil.rmtree(env_dir)
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True)
    started = time.monotonic()
    proc = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                           *requirements], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the image stand-in at {env_dir} did not install:\n{proc.stderr[-3000:]}")
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format=json", "--disable-pip-version-check"],
                            check=True, capture_output=True, text=True).stdout
    extra = sorted(canonical(d["name"]) for d in json.loads(listed))
    extra = [name for name in extra if name not in image_packages() and name not in ("pip", "setuptools", "wheel")]
    if extra:  # not in the image: the bundle must bring them, so the stand-in must lack them
        subprocess.run([str(python), "-m", "pip", "uninstall", "--quiet", "-y", *extra], check=True,
                       capture_output=True)
    stamp.write_text(json.dumps(requirements) + "\n")
    print(f"[rehearsal] image stand-in: {len(requirements)} packages asked for in {env_dir}, {len(extra)} that "
          f"the image lacks removed ({' '.join(extra) or 'none'}); {time.monotonic() - started:.0f} s", flush=True)
    return str(python)


def wheels_for(image_python: str, wheels: Path, out: Path) -> Path:
    """The bundle as `image_python` can install it: unchanged for CPython 3.12; else a copy in `out` whose cp312
    binary wheels are swapped for the same versions built for that Python (the pure wheels, the DeepSpeed sdist
    and the tokenizer are the bundle's own)."""
    tag = subprocess.run([image_python, "-c", "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')"],
                         check=True, capture_output=True, text=True).stdout.strip()
    if tag == "cp312":
        return wheels
    manifest = json.loads((wheels / MANIFEST).read_text())
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(wheels, out)
    for entry in manifest["files"]:
        if entry["file"].endswith(".whl") and entry["file"][:-len(".whl")].split("-")[-2] == "cp312":
            (out / entry["file"]).unlink()
            before = set(os.listdir(out))
            proc = _pip("download", "--no-deps", "--only-binary=:all:", "--python-version", tag[2] + "." + tag[3:],
                        "-d", str(out), f"{entry['name']}=={entry['version']}")
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr[-2000:])
            entry["file"] = sorted(set(os.listdir(out)) - before)[0]
            print(f"[rehearsal] {entry['name']}: {entry['file']} stands in for the cp312 wheel", flush=True)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


def rehearsal(work: Path, report_dir: Path, reuse_bundle: bool = False) -> int:
    """`make gpu-rehearsal`: the GPU tier's whole pipeline on this CPU machine, as the GPU machine runs it. Builds
    the bundle (`wheels`), a stand-in for the GPU image (only its packages; CPU torch), installs the bundle into
    the overlay with no index and no network, then `test` and `bench` with the device set to CPU (every `gpu`
    test on the CPU unless it needs what only CUDA has; every benchmark arm a step or two, tiny shapes).
    Returns non-zero on anything that would fail on the GPU machine for a reason other than CUDA."""
    started = time.monotonic()
    work.mkdir(parents=True, exist_ok=True)
    wheels = work / "wheels"
    if not (reuse_bundle and (wheels / MANIFEST).is_file()):
        build_bundle(wheels)
    print(f"[rehearsal] bundle ready ({time.monotonic() - started:.0f} s)", flush=True)
    image_python = make_image_env(work / "image")
    local = wheels_for(image_python, wheels, work / "wheels_local")
    if report_dir.exists():
        shutil.rmtree(report_dir)
    # its own JIT build of DeepSpeed's ops: the overlay's deepspeed lives elsewhere than .venv's, and one folder
    # shared by two installs rebuilds at every switch
    os.environ["TORCH_EXTENSIONS_DIR"] = str((work / "torch_extensions").resolve())
    codes = {command: run_command(command, local, report_dir, image_python, work / "overlay", device="cpu")
             for command in ("test", "bench")}
    print(f"[rehearsal] {time.monotonic() - started:.0f} s in all; test exit {codes['test']}, bench exit "
          f"{codes['bench']}; report {report_dir / 'report.md'}", flush=True)
    return 0 if not any(codes.values()) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_wheels = sub.add_parser("wheels", help="download the bundle (needs the package index)")
    p_wheels.add_argument("--out", default=str(REPO / ".gpu_wheels"))
    for name, text in (("test", "install once, the gpu tests"), ("bench", "install once, the GPU benchmarks"),
                       ("check", "test, then bench")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--wheels", default=str(REPO / ".gpu_wheels"))
        p.add_argument("--report-dir", default=str(REPO / "runs" / "gpu_check"))
        p.add_argument("--env-dir", default=str(REPO / ".gpu_env"))
        p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                       help="cpu: the rehearsal's run (gpu tests on the CPU, tiny benchmark shapes)")
    p_rehearse = sub.add_parser("rehearsal", help="the whole GPU pipeline on this CPU machine (needs the index)")
    p_rehearse.add_argument("--work", default=str(REPO / ".gpu_rehearsal"))
    p_rehearse.add_argument("--report-dir", default=str(REPO / "runs" / "gpu_rehearsal"))
    p_rehearse.add_argument("--reuse-bundle", action="store_true", help="keep a bundle already in --work")
    args = parser.parse_args(argv)
    if args.command == "wheels":
        build_bundle(Path(args.out))
        return 0
    if args.command == "rehearsal":
        return rehearsal(Path(args.work), Path(args.report_dir), args.reuse_bundle)
    wheels = Path(args.wheels)
    if not (wheels / MANIFEST).is_file():
        print(f"[gpu-check] {wheels}/{MANIFEST} not found: run `make gpu-wheels` on a machine with the "
              "package index and copy the folder along", file=sys.stderr)
        return 2
    commands = ("test", "bench") if args.command == "check" else (args.command,)
    codes = [run_command(c, wheels, Path(args.report_dir), sys.executable, Path(args.env_dir), args.device)
             for c in commands]
    return max(codes)


if __name__ == "__main__":
    sys.exit(main())
