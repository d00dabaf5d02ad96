"""The GPU tier in one command: every `gpu`-marked test, the training MFU benchmark and the loss-memory benchmark
on one CUDA machine with no network, and a report (markdown + JSON, device named).

    make gpu-wheels      # here, with the package index: .gpu_wheels/ (wheels + DeepSpeed sdist + SmolLM2 tokenizer)
    make gpu-check       # on the GPU machine (copy the repo with .gpu_wheels/): install, test, benchmark, report
    make gpu-check GPU_REPORT=/some/dir GPU_PY=/opt/torch/.venv/bin/python3

    python benchmarks/gpu_check.py wheels --out .gpu_wheels                          # what `make gpu-wheels` runs
    python3 benchmarks/gpu_check.py check --wheels .gpu_wheels --report-dir runs/gpu_check
    python benchmarks/gpu_check.py dry-run --image-python /tmp/img/bin/python          # prove the install step here

The GPU machine is assumed to hold CUDA torch, transformers, accelerate and the rest of the packages listed in
tests/gpu/image_packages.txt (Python 3.12), but none of deepspeed, flask, jsonlines, markdownify, ... `wheels` takes
the dependency closure of `ds-vicuna[dev]` from this checkout's .venv (the versions the CPU suite passed with), less
the image's packages and selenium (browser tests need Chromium, absent there), and downloads each as a cp312
manylinux x86_64 or pure-Python wheel; a package published only as a source archive is built into a pure wheel
here; DeepSpeed comes as its sdist (its ops are compiled just in time on the GPU machine; DS_BUILD_OPS=0).
`check` makes an overlay environment (.gpu_env/: its own site-packages first, then the machine's, so the
machine's torch is used and never reinstalled), installs the bundle with `pip install --no-index --no-deps`, and
runs `pytest -m gpu tests/` (every gpu test, the serving ones too), then the benchmarks, each within a time budget.
Only the standard library is used by `check` until the overlay exists.
"""
from __future__ import annotations

import argparse
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
GPU_PYTHON = "3.12"
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in range(39, 16, -1)] + ["manylinux2014_x86_64", "manylinux1_x86_64"]
MAX_BUNDLE_MIB = 48  # the whole working tree travels in 64 MiB
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
BUDGETS_S = {"install": 150, "tests": 330, "loss_memory": 60, "bench_train": 280}  # ~9 min expected, 14 at most
NO_GPU_EXIT = 3


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
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, **kwargs)


def fetch_one(name: str, version: str, out: Path) -> str:
    """Put `name==version` into `out` as a wheel for cp312 manylinux x86_64 (or pure Python); DeepSpeed as its
    sdist. Returns how it was obtained. Raises RuntimeError naming the package when nothing fits."""
    spec = f"{name}=={version}"
    if name == "deepspeed":
        proc = _pip("download", "--no-deps", "--no-binary=:all:", "-d", str(out), spec)
        how = "sdist (ops built just in time on the GPU machine)"
    else:
        platform_args = [arg for p in PLATFORMS for arg in ("--platform", p)]
        proc = _pip("download", "--no-deps", "--only-binary=:all:", "--python-version", GPU_PYTHON,
                    "--implementation", "cp", "--abi", "cp312", "--abi", "abi3", "--abi", "none", *platform_args,
                    "-d", str(out), spec)
        how = "wheel"
        if proc.returncode != 0:  # published as a source archive only: build it here, it must come out pure
            proc = _pip("wheel", "--no-deps", "--no-binary", name, "-w", str(out), spec)
            how = "built here from its sdist"
    if proc.returncode != 0:
        raise RuntimeError(f"{spec}: cannot fetch it for Python {GPU_PYTHON} x86_64:\n{proc.stderr[-2000:]}")
    return how


def wheel_fits_gpu_python(filename: str) -> bool:
    """True for a wheel that installs on CPython 3.12 manylinux x86_64 (pure, abi3 or cp312)."""
    if filename.endswith(".tar.gz"):
        return filename.startswith("deepspeed-")
    parts = filename[:-len(".whl")].split("-")
    python_tag, abi_tag, platform_tag = parts[-3:]
    pure = platform_tag == "any" and abi_tag == "none" and any(t.startswith("py3") for t in python_tag.split("."))
    native = ("cp312" in python_tag.split(".") or abi_tag == "abi3") and "x86_64" in platform_tag \
        and platform_tag.startswith(("manylinux", "linux"))
    return pure or native


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
    files = []
    for name, version in needed.items():
        before = set(os.listdir(out))
        how = fetch_one(name, version, out)
        added = sorted(set(os.listdir(out)) - before)
        if len(added) != 1 or not wheel_fits_gpu_python(added[0]):
            raise RuntimeError(f"{name}=={version}: got {added}, not one file that installs on CPython "
                               f"{GPU_PYTHON} x86_64")
        files.append({"name": name, "version": version, "file": added[0], "how": how})
        print(f"[gpu-wheels] {name}=={version}: {added[0]} ({how})", flush=True)
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


def install_bundle(python: Path, wheels: Path, log: list) -> None:
    """pip install --no-index --no-deps of the bundle, then this checkout (editable), into the overlay."""
    manifest = json.loads((wheels / MANIFEST).read_text())
    files = [str(wheels / f["file"]) for f in manifest["files"]]
    env = dict(os.environ, DS_BUILD_OPS="0", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("PIP_FIND_LINKS", None)
    env.pop("PIP_CONSTRAINT", None)
    env["PIP_CONFIG_FILE"] = os.devnull  # this machine's pip settings (indexes, constraints) play no part
    for step in (files, ["-e", str(REPO)]):
        command = [str(python), "-m", "pip", "install", "--no-index", "--no-deps", "--no-build-isolation",
                   "--use-pep517", "--no-cache-dir", "--find-links", str(wheels), *step]
        proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=BUDGETS_S["install"])
        log.append({"command": " ".join(command[3:8]) + " ...", "rc": proc.returncode,
                    "output": (proc.stdout + proc.stderr)[-3000:]})
        if proc.returncode != 0:
            raise RuntimeError(f"install failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


ENV_PROBE = r"""
import json, platform, importlib.metadata as md
info = {"python": platform.python_version()}
for name in ("torch", "transformers", "deepspeed", "accelerate", "flash-attn", "triton"):
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


def probe_environment(python: Path) -> dict:
    proc = subprocess.run([str(python), "-c", ENV_PROBE], capture_output=True, text=True, timeout=180)
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_phase(name: str, command: list, log_path: Path, env: dict) -> dict:
    """Run one phase with its time budget (the whole process group is killed past it), output to `log_path`;
    returns {phase, rc, seconds, timed_out}."""
    started = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(c) for c in command], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                start_new_session=True)
        try:
            rc, timed_out = proc.wait(timeout=BUDGETS_S[name]), False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its trainer subprocesses too: they hold the GPU
            proc.wait()
            rc, timed_out = None, True
    seconds = round(time.monotonic() - started, 1)
    print(f"[gpu-check] {name}: rc {rc}{' (timed out)' if timed_out else ''} in {seconds} s; log {log_path}",
          flush=True)
    return {"phase": name, "rc": rc, "seconds": seconds, "timed_out": timed_out, "log": log_path.name}


def run_check(wheels: Path, report_dir: Path, base_python: str, env_dir: Path, skip_bench: bool,
              allow_no_gpu: bool) -> int:
    """`make gpu-check`. Returns the exit code: 0 all passed on a GPU, 1 a failure, 3 no GPU here."""
    report_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    report = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host": platform.node(), "phases": []}
    install_log: list = []
    try:
        python = make_overlay(base_python, env_dir)
        install_bundle(python, wheels, install_log)
    except (RuntimeError, subprocess.SubprocessError, OSError) as err:
        report.update(error=f"install: {err}", install=install_log, seconds=round(time.monotonic() - started, 1))
        write_report(report_dir, report)
        print(f"[gpu-check] {err}", file=sys.stderr)
        return 1
    report["install"] = install_log
    report["pip_check"] = subprocess.run([str(python), "-m", "pip", "check"], capture_output=True,
                                         text=True).stdout.strip()
    report["environment"] = probe_environment(python)
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
    junit = report_dir / "junit.xml"
    write_report(report_dir, report)  # after every phase: a run cut short still leaves its report
    report["phases"].append(run_phase("tests", [python, "-m", "pytest", "-m", "gpu", "-ra", "-p", "no:cacheprovider",
                                                f"--junitxml={junit}", "tests"], report_dir / "tests.log", env))
    report["tests"] = read_junit(junit) if junit.is_file() else []
    write_report(report_dir, report)
    cuda = report["environment"].get("cuda_available", False)
    if not skip_bench and cuda:
        loss_json, train_json = report_dir / "loss_memory.json", report_dir / "bench_train.json"
        benches = (("loss_memory", loss_json, ["benchmarks/bench_loss_memory.py", "--device", "cuda"]),
                   ("bench_train", train_json,
                    ["benchmarks/bench_gpu_train.py", "--tokenizer", wheels / TOKENIZER_DIR]))
        for key, path, command in benches:
            report["phases"].append(run_phase(key, [python, *command, "--json", path], report_dir / f"{key}.log", env))
            report[key] = json.loads(path.read_text()) if path.is_file() else None
            write_report(report_dir, report)
    report["seconds"] = round(time.monotonic() - started, 1)
    write_report(report_dir, report)
    failed = [t for t in report["tests"] if t["outcome"] in ("failed", "error")]
    phase_failed = [p for p in report["phases"] if p["rc"] not in (0, 5) or p["timed_out"]]
    if not cuda:
        print("[gpu-check] no CUDA device here: every gpu test skipped (see the report)", file=sys.stderr)
        return 0 if allow_no_gpu and not failed else NO_GPU_EXIT
    return 1 if failed or phase_failed else 0


# ------------------------------------------------------------------------------------------------------- report


def read_junit(path: Path) -> list[dict]:
    """[{name, outcome (passed/failed/error/skipped), seconds, message}] from pytest's JUnit XML."""
    tests = []
    for case in ET.parse(path).getroot().iter("testcase"):
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
    """report.json (everything) and report.md (what a person reads first) in `report_dir`."""
    json_path, md_path = report_dir / "report.json", report_dir / "report.md"
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    md_path.write_text(render_markdown(report))
    return md_path, json_path


def render_markdown(report: dict) -> str:
    env = report.get("environment") or {}
    device = env.get("device") or ("no CUDA device" if env else "unknown (install failed)")
    tests = report.get("tests", [])
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "error", "skipped")}
    versions = ", ".join(f"{name} {env.get(name)}" for name in ("torch", "cuda", "transformers", "deepspeed", "python")
                         if env.get(name))
    memory = f", {env['memory_gib']} GiB" if env.get("memory_gib") else ""
    lines = [f"# ds-vicuna GPU check: {device}", "",
             f"{report.get('started', '')} on {report.get('host', '')}, {report.get('seconds', '?')} s in all; "
             f"{versions}{memory}.", ""]
    if report.get("error"):
        lines += ["**Stopped:** " + report["error"].splitlines()[0], ""]
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
        lines += [f"## Training throughput ({bench.get('model', '')})", "",
                  "| max length | ZeRO config | attention | steps timed | real tokens/s/GPU | MFU | peak GiB | note |",
                  "|---:|---|---|---:|---:|---:|---:|---|"]
        for arm in bench["arms"]:
            mfu = f"{100 * arm['mfu']:.1f}%" if arm.get("mfu") is not None else "-"
            tok = f"{arm['tokens_per_s']:.0f}" if arm.get("tokens_per_s") else "-"
            mem = f"{arm['peak_gib']:.1f}" if arm.get("peak_gib") else "-"
            lines.append(f"| {arm['max_length']} | {arm['deepspeed']} | {arm['attn']} | {arm.get('steps_timed', 0)} "
                         f"| {tok} | {mfu} | {mem} | {arm.get('error', '')[:120]} |")
        lines.append("")
    loss = report.get("loss_memory")
    if loss and loss.get("arms"):
        lines += [f"## Loss peak memory ({loss.get('shape', '')})", "", "| loss | peak MiB above the model |",
                  "|---|---:|"]
        lines += [f"| {a['loss']} | {a['peak_mib']:.0f} |" for a in loss["arms"]]
        lines.append("")
    if report.get("phases"):
        lines += ["## Phases", "", "| phase | exit | s | log |", "|---|---:|---:|---|"]
        lines += [f"| {p['phase']} | {'timeout' if p['timed_out'] else p['rc']} | {p['seconds']} | {p['log']} |"
                  for p in report["phases"]]
        lines.append("")
    if report.get("pip_check"):
        lines += ["pip check: " + report["pip_check"].splitlines()[0], ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ dry run


def dry_run(image_python: str, wheels: Path, report_dir: Path, py312: str | None) -> int:
    """Prove `check`'s install step here, on CPU (every gpu test skips, the report says so).

    `image_python`: a venv holding the image's packages and nothing of the bundle (tests/gpu/README.md says how
    to make one). When it is not CPython 3.12, the bundle's cp312 binary wheels are swapped for the same versions
    built for it, in a copy of the bundle; `py312` (a CPython 3.12) then installs the real cp312 files into a
    scratch venv (--no-deps, no torch there: DeepSpeed's sdist is left out) and imports each package.
    """
    report_dir.mkdir(parents=True, exist_ok=True)
    manifest, original = json.loads((wheels / MANIFEST).read_text()), wheels
    tag = subprocess.run([image_python, "-c", "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')"],
                         check=True, capture_output=True, text=True).stdout.strip()
    if tag != "cp312":
        local = report_dir / "wheels"
        if local.exists():
            shutil.rmtree(local)
        shutil.copytree(wheels, local)
        for entry in manifest["files"]:
            if entry["file"].endswith(".whl") and not entry["file"].endswith("-none-any.whl"):
                (local / entry["file"]).unlink()
                before = set(os.listdir(local))
                version = tag[2] + "." + tag[3:]
                proc = _pip("download", "--no-deps", "--only-binary=:all:", "--python-version", version,
                            "-d", str(local), f"{entry['name']}=={entry['version']}")
                if proc.returncode != 0:
                    raise RuntimeError(proc.stderr[-2000:])
                entry["file"] = sorted(set(os.listdir(local)) - before)[0]
                print(f"[dry-run] {entry['name']}: {entry['file']} stands in for the cp312 wheel", flush=True)
        (local / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        wheels = local
    if py312:
        import_binary_wheels(py312, original, report_dir / "py312_env")
    return run_check(wheels, report_dir, image_python, REPO / ".gpu_env", skip_bench=True, allow_no_gpu=True)


def import_binary_wheels(py312: str, wheels: Path, env_dir: Path) -> None:
    """Install the bundle's compiled (cp312) wheels into a scratch CPython 3.12 venv and import each one.

    Raises:
        RuntimeError: one does not install or import there.
    """
    manifest = json.loads((wheels / MANIFEST).read_text())
    binary = [f for f in manifest["files"] if f["file"].endswith(".whl") and not f["file"].endswith("-none-any.whl")]
    if env_dir.exists():
        shutil.rmtree(env_dir)
    subprocess.run([py312, "-m", "venv", str(env_dir)], check=True)
    python = str(env_dir / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "-q", "typing-extensions"], check=True)  # their one need here
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                    *[str(wheels / f["file"]) for f in binary]], check=True)
    for entry in binary:
        module = entry["name"].replace("-", "_")
        proc = subprocess.run([python, "-c", f"import {module}, sys; print(sys.version.split()[0], {module}.__file__)"],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{entry['file']} does not import on CPython 3.12: {proc.stderr[-1000:]}")
        print(f"[dry-run] {entry['file']}: imports on Python {proc.stdout.strip()}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_wheels = sub.add_parser("wheels", help="download the bundle (needs the package index)")
    p_wheels.add_argument("--out", default=str(REPO / ".gpu_wheels"))
    p_check = sub.add_parser("check", help="install the bundle, run the gpu tests and benchmarks, write the report")
    p_check.add_argument("--wheels", default=str(REPO / ".gpu_wheels"))
    p_check.add_argument("--report-dir", default=str(REPO / "runs" / "gpu_check"))
    p_check.add_argument("--env-dir", default=str(REPO / ".gpu_env"))
    p_check.add_argument("--skip-bench", action="store_true")
    p_check.add_argument("--allow-no-gpu", action="store_true", help="exit 0 when no CUDA device is present")
    p_dry = sub.add_parser("dry-run", help="check's install + collection here, with a python that mimics the image")
    p_dry.add_argument("--image-python", required=True)
    p_dry.add_argument("--py312", help="a CPython 3.12 to import the bundle's cp312 wheels with")
    p_dry.add_argument("--wheels", default=str(REPO / ".gpu_wheels"))
    p_dry.add_argument("--report-dir", default=str(REPO / "runs" / "gpu_check_dry_run"))
    args = parser.parse_args(argv)
    if args.command == "wheels":
        build_bundle(Path(args.out))
        return 0
    if args.command == "check":
        wheels = Path(args.wheels)
        if not (wheels / MANIFEST).is_file():
            print(f"[gpu-check] {wheels}/{MANIFEST} not found: run `make gpu-wheels` on a machine with the "
                  "package index and copy the folder along", file=sys.stderr)
            return 2
        return run_check(wheels, Path(args.report_dir), sys.executable, Path(args.env_dir), args.skip_bench,
                         args.allow_no_gpu)
    return dry_run(args.image_python, Path(args.wheels), Path(args.report_dir), args.py312)


if __name__ == "__main__":
    sys.exit(main())
