"""benchmarks/gpu_check.py without a GPU: what the bundle must hold, which wheel files fit the GPU machine, and
the report of a suite that skipped (what `make gpu-check` writes on a machine without CUDA)."""
import importlib.util
import json
import os
import sys

import pytest

from tests.support.tiny_llama import REPO


def phase(name: str, rc, seconds: float = 1.0, timed_out: bool = False) -> dict:
    return {"phase": name, "rc": rc, "seconds": seconds, "budget_s": 100, "timed_out": timed_out, "log": "x.log"}


def case(name: str, outcome: str, message: str = "") -> dict:
    return {"name": f"tests/train/test_gpu.py::{name}", "outcome": outcome, "seconds": 0.1, "message": message}


CUDA_ENV = {"cuda_available": True, "device": "NVIDIA H100 80GB HBM3"}


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bundle_holds_what_the_image_lacks(gpu_check):
    image = gpu_check.image_packages()
    assert {"torch", "transformers", "accelerate", "pytest", "pyyaml", "sentencepiece"} <= image
    needed = gpu_check.bundle_requirements(image)
    # the trainer, the servers, the data cleaners and the eval client, with their own needs
    assert {"deepspeed", "hjson", "pydantic", "flask", "jsonlines", "markdownify", "langdetect", "waitress",
            "openai", "gguf"} <= needed.keys()
    assert not needed.keys() & image and "selenium" not in needed and "ds-vicuna" not in needed
    assert all(version[0].isdigit() for version in needed.values())


def test_every_import_is_on_the_gpu_machine(gpu_check):
    """Each third-party module imported at the top of a package or test module comes from the image or the
    bundle, so `pytest -m gpu tests/` collects there (one missing import stops the whole collection)."""
    import ast
    import importlib.metadata as metadata
    import sys

    available = gpu_check.image_packages() | set(gpu_check.bundle_requirements(gpu_check.image_packages()))
    owners = metadata.packages_distributions()
    local = {"ds_vicuna", "tests", "make_sample_data"}
    files = [*REPO.glob("ds_vicuna/**/*.py"), *REPO.glob("serve/**/*.py"), *REPO.glob("eval/**/*.py"),
             *(p for p in REPO.glob("tests/**/*.py") if "assets" not in p.parts)]
    missing = set()
    for path in files:
        for node in ast.parse(path.read_text()).body:  # module level only: what collection imports
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in local or top == "__future__":
                    continue
                if not {gpu_check.canonical(d) for d in owners.get(top, [top])} & available:
                    missing.add(f"{path.relative_to(REPO)}: {top}")
    assert not missing, sorted(missing)


def test_the_qlora_kernels_travel_slimmed_to_the_image_cuda(gpu_check, tmp_path):
    """bitsandbytes is bundled (41 MiB as published: one library per CUDA/ROCm version); the slim copy keeps the
    CPU and CUDA 12.6-13.x libraries and drops their RECORD lines, so pip installs it."""
    import zipfile

    assert "bitsandbytes" in gpu_check.bundle_requirements(gpu_check.image_packages())
    wheel = tmp_path / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"
    libs = ["cpu", "cuda118", "cuda126", "cuda128", "cuda130", "cuda132", "rocm64", "xpu2025"]
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("bitsandbytes/__init__.py", "")
        for lib in libs:
            z.writestr(f"bitsandbytes/libbitsandbytes_{lib}.so", b"x" * 10)
        record = [f"bitsandbytes/libbitsandbytes_{lib}.so,sha256=abc,10" for lib in libs]
        z.writestr("bitsandbytes-0.50.2.dist-info/RECORD", "\n".join(["bitsandbytes/__init__.py,,0", *record]))
    dropped = gpu_check.slim_wheel(wheel, gpu_check.SLIM_DROP["bitsandbytes"])
    assert sorted(dropped) == [f"bitsandbytes/libbitsandbytes_{lib}.so" for lib in ("cuda118", "rocm64", "xpu2025")]
    with zipfile.ZipFile(wheel) as z:
        kept = {n for n in z.namelist() if n.endswith(".so")}
        assert kept == {f"bitsandbytes/libbitsandbytes_{lib}.so" for lib in ("cpu", "cuda126", "cuda128", "cuda130",
                                                                              "cuda132")}
        record = z.read("bitsandbytes-0.50.2.dist-info/RECORD").decode()
    assert "cuda118" not in record and "cuda130" in record
    with pytest.raises(RuntimeError, match="no member matches"):
        gpu_check.slim_wheel(wheel, gpu_check.SLIM_DROP["bitsandbytes"])


@pytest.mark.parametrize("name, fits", [
    ("flask-3.1.3-py3-none-any.whl", True),
    ("pydantic_core-2.50.5-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl", True),
    ("jiter-0.19.0-cp311-cp311-manylinux_2_17_x86_64.whl", False),
    ("foo-1.0-cp312-cp312-manylinux_2_17_aarch64.whl", False),
    ("foo-1.0-cp39-abi3-manylinux_2_28_x86_64.whl", True),
    ("foo-1.0-cp312-cp312-macosx_11_0_arm64.whl", False),
    ("deepspeed-0.19.8.tar.gz", True),
])
def test_wheel_tags(gpu_check, name, fits):
    assert gpu_check.wheel_fits_gpu_python(name) is fits


def test_report_of_a_skipped_suite(gpu_check, tmp_path):
    junit = tmp_path / "junit.xml"
    junit.write_text(
        '<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="2" skipped="2">'
        '<testcase classname="tests.train.test_gpu" name="test_chunked_loss_equals_plain_gpu[bf16-tied]" time="0.001">'
        '<skipped type="pytest.skip" message="needs a CUDA GPU (torch.cuda.is_available() is False)">x</skipped>'
        '</testcase><testcase classname="tests.serve.test_gpu" name="test_generate_gpu" time="0.002">'
        '<skipped type="pytest.skip" message="needs a CUDA GPU">y</skipped></testcase></testsuite></testsuites>')
    tests = gpu_check.read_junit(junit)
    assert [t["outcome"] for t in tests] == ["skipped", "skipped"]
    assert tests[0]["name"] == "tests/train/test_gpu.py::test_chunked_loss_equals_plain_gpu[bf16-tied]"
    report = {"command": "test", "started": "now", "host": "box", "seconds": 3.0, "tests": tests,
              "environment": {"torch": "2.13.0+cpu", "cuda_available": True, "device": "NVIDIA H100 80GB HBM3",
                              "python": "3.12.3"},
              "phases": [phase("tests", 0, 2.5)],
              "bench_train": {"model": "m", "arms": [
                  {"max_length": 4096, "deepspeed": "zero3", "attn": "sdpa", "steps_timed": 17,
                   "tokens_per_s": 30000.0, "mfu": 0.41, "peak_gib": 50.2},
                  {"max_length": 4096, "deepspeed": "zero3", "attn": "flex_attention", "error": "exit 1: boom"}]}}
    report["problems"] = gpu_check.verdict(report, "cuda")
    md_path, json_path = gpu_check.write_report(tmp_path, report)
    text = md_path.read_text()
    assert text.startswith("# ds-vicuna GPU check (test, device cuda): NVIDIA H100")
    assert "0 passed, 0 failed, 0 errors, 2 skipped" in text and "needs a CUDA GPU" in text
    assert "| 4096 | zero3 | sdpa | 17 | 30000 | 41.0% | 50.2 |" in text and "exit 1: boom" in text
    assert "**Verdict: FAILED**" in text and "every test skipped (2): nothing was proven" in text
    assert json.loads(json_path.read_text())["runs"][0]["tests"] == tests


def test_check_refuses_without_the_bundle(gpu_check, tmp_path, capsys):
    assert gpu_check.main(["check", "--wheels", str(tmp_path)]) == 2
    assert "make gpu-wheels" in capsys.readouterr().err


@pytest.mark.slow
def test_gpu_benchmark_plumbing_on_cpu(tmp_path):
    """bench_gpu_train.py's arm (config overrides, setup + fit, metrics) on a tiny model on CPU, so the GPU run
    can only fail for GPU reasons."""
    import sys

    from tests.support.tiny_llama import run_checked

    out = tmp_path / "bench.json"
    run_checked([sys.executable, REPO / "benchmarks/bench_gpu_train.py", "--tiny", "--arms", "512:zero3:sdpa",
                 "--steps", "3", "--warmup", "1", "--conversations", "60", "--tokens-per-step", "1024",
                 "--micro-tokens", "512", "--work-dir", tmp_path / "work", "--json", out], timeout=600)
    (arm,) = json.loads(out.read_text())["arms"]
    assert "error" not in arm, arm
    assert arm["steps_timed"] == 2 and arm["accumulation"] == 2 and arm["tokens_per_s"] > 0
    assert arm["mfu"] is None and len(arm["losses"]) == 3  # no GPU peak to divide by on CPU


# ------------------------------------------------------------------- never success without evidence (the verdict)


def test_all_passed_with_hardware_skips_is_success(gpu_check):
    flash = gpu_check.HARDWARE_SKIP + " needs flash-attn (not installed)"
    report = {"environment": CUDA_ENV, "phases": [phase("install", 0), phase("probe", 0), phase("tests", 0)],
              "tests": [case("a", "passed"), case("b", "passed"), case("flash", "skipped", flash)]}
    assert gpu_check.verdict(report, "cuda") == []


def test_no_test_collected_fails(gpu_check):
    report = {"environment": CUDA_ENV, "phases": [phase("tests", 5)], "tests": []}
    problems = gpu_check.verdict(report, "cuda")
    assert "phase tests exited 5 (pytest collected no tests)" in problems
    assert "no test collected (or none reported)" in problems


def test_every_test_skipped_fails(gpu_check):
    skip = gpu_check.HARDWARE_SKIP + " needs 2 CUDA GPUs (1 here)"
    report = {"environment": CUDA_ENV, "phases": [phase("tests", 0)], "tests": [case("a", "skipped", skip)] * 3}
    assert gpu_check.verdict(report, "cuda") == ["every test skipped (3): nothing was proven"]


def test_fewer_passed_than_can_run_here_fails(gpu_check):
    """A skip for any reason but the machine's (a CUDA check that misfired, a missing fixture) is not a pass."""
    report = {"environment": CUDA_ENV, "phases": [phase("tests", 0)],
              "tests": [case("a", "passed"), case("b", "skipped", "needs a CUDA GPU"), case("c", "passed")]}
    (problem,) = gpu_check.verdict(report, "cuda")
    assert problem.startswith("2 of the 3 tests that can run here passed") and "::b (skipped)" in problem


def test_a_failed_test_fails(gpu_check):
    report = {"environment": CUDA_ENV, "phases": [phase("tests", 1)],
              "tests": [case("a", "passed"), case("b", "failed", "assert 1 == 2")]}
    problems = gpu_check.verdict(report, "cuda")
    assert "phase tests exited 1" in problems and any("1 of the 2" in p for p in problems)


def test_a_benchmark_arm_error_fails(gpu_check):
    arms = [{"arm": "4096:zero3:sdpa", "tokens_per_s": 1.0},
            {"arm": "4096:zero3:flex_attention", "error": "exit 1: ConfigError: model.attn_implementation"}]
    report = {"environment": CUDA_ENV, "phases": [phase("bench_train", 0)], "bench_train": {"arms": arms}}
    assert gpu_check.verdict(report, "cuda") == [
        "bench_train arm 4096:zero3:flex_attention: exit 1: ConfigError: model.attn_implementation"]
    cpu_flex = {"arm": "4096:zero3:flex_attention", "skipped": gpu_check.HARDWARE_SKIP + " needs CUDA"}
    report = {"environment": CUDA_ENV, "phases": [phase("bench_train", 0)],
              "bench_train": {"arms": [arms[0], cpu_flex]}}
    assert gpu_check.verdict(report, "cpu") == []  # an arm only CUDA can run, skipped in the rehearsal
    report["bench_train"]["arms"] = [cpu_flex]
    assert gpu_check.verdict(report, "cpu") == ["bench_train: no arm ran"]
    report = {"environment": CUDA_ENV, "phases": [phase("bench_train", 0)], "bench_train": None}
    assert gpu_check.verdict(report, "cuda") == ["bench_train: no results written"]
    report["bench_train"] = {"skipped": "no CUDA device", "arms": []}
    assert "bench_train: measured nothing (no CUDA device)" in gpu_check.verdict(report, "cuda")


def test_a_phase_past_its_budget_fails(gpu_check):
    report = {"environment": CUDA_ENV, "phases": [phase("tests", None, 180.0, timed_out=True)],
              "tests": [case("a", "passed")]}
    assert gpu_check.verdict(report, "cuda") == ["phase tests ran past its 100 s budget"]


def test_a_probe_crash_is_named_not_taken_for_no_gpu(gpu_check, tmp_path, monkeypatch):
    crashing = tmp_path / "python"
    crashing.write_text("#!/bin/sh\necho 'ImportError: libcudart.so.13: cannot open shared object file' >&2\nexit 1\n")
    crashing.chmod(0o755)
    env = gpu_check.probe_environment(crashing)
    assert env == {"probe_crash": "exit 1: ImportError: libcudart.so.13: cannot open shared object file"}
    monkeypatch.setattr(gpu_check, "ensure_installed", lambda *a: (crashing, phase("install", 0)))
    wheels = tmp_path / "wheels"
    assert gpu_check.run_command("test", wheels, tmp_path / "report", "python3", tmp_path / "env") == 1
    text = (tmp_path / "report" / "report.md").read_text()
    assert "probe crash" in text and "no CUDA device" not in text and "libcudart" in text
    report = json.loads((tmp_path / "report" / "test.json").read_text())
    assert report["problems"] == ["probe crash: exit 1: ImportError: libcudart.so.13: cannot open shared object file"]


def test_no_cuda_device_is_not_success(gpu_check, tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "ensure_installed", lambda *a: (sys.executable, phase("install", 0)))
    monkeypatch.setattr(gpu_check, "probe_environment", lambda *a: {"cuda_available": False, "torch": "x"})
    assert gpu_check.run_command("test", tmp_path, tmp_path / "r", "python3", tmp_path / "env") == \
        gpu_check.NO_GPU_EXIT


# ------------------------------------------------------------------------------------------- budgets and timeouts


def test_each_command_fits_five_minutes_on_the_device(gpu_check):
    """`make gpu-test` and `make gpu-bench` are one device command each (5 minutes, install included)."""
    for command, phases in gpu_check.COMMAND_PHASES.items():
        assert "install" in phases and "probe" in phases, command
        assert sum(gpu_check.BUDGETS_S[p] for p in phases) <= gpu_check.COMMAND_LIMIT_S <= 300 - 10, command
    assert gpu_check.GRACE_S < min(gpu_check.BUDGETS_S[p] for p in ("tests", "loss_memory", "bench_train")) / 2


def test_a_timed_out_pytest_still_writes_its_junit(gpu_check, tmp_path, monkeypatch):
    """The phase budget interrupts pytest (SIGINT) before it kills it, so the tests that ran are reported."""
    (tmp_path / "test_sleepy.py").write_text(
        "import time\n\ndef test_quick():\n    pass\n\n\ndef test_sleepy():\n    time.sleep(120)\n")
    monkeypatch.setitem(gpu_check.BUDGETS_S, "tests", 12)
    monkeypatch.setattr(gpu_check, "GRACE_S", 4)
    junit = tmp_path / "junit.xml"
    record = gpu_check.run_phase("tests", [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-o",
                                           "timeout=0", f"--junitxml={junit}", "--rootdir", tmp_path,
                                           tmp_path / "test_sleepy.py"], tmp_path / "tests.log", dict(os.environ))
    assert record["timed_out"] and record["rc"] is None and record["seconds"] < 12 + 5
    tests = gpu_check.read_junit(junit)
    assert [(t["name"].split("::")[-1], t["outcome"]) for t in tests] == [
        ("test_quick", "passed"), ("(the test running at the budget)", "error")]
    assert gpu_check.verdict({"phases": [record], "tests": tests}, "cpu")[0] == "phase tests ran past its 12 s budget"


def test_the_hardware_skip_prefix_is_one_string(gpu_check):
    from tests.support.gpu_device import HARDWARE_SKIP, hardware_skip_reason

    assert HARDWARE_SKIP == gpu_check.HARDWARE_SKIP
    assert hardware_skip_reason("flash-attn").startswith(gpu_check.HARDWARE_SKIP)


# ------------------------------------------------------------------------------------------ defects 1 and 2


def test_flex_attention_is_a_valid_attention_choice():
    from ds_vicuna.config import load_config

    cfg = load_config(None, ["--attn_implementation", "flex_attention"])
    assert cfg.model.attn_implementation == "flex_attention"


@pytest.mark.slow
def test_an_errored_arm_fails_the_benchmark(tmp_path):
    """bench_gpu_train exits non-zero when an arm errors (it wrote the error into its JSON and exited 0)."""
    import subprocess

    from tests.support.tiny_llama import subprocess_env

    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, REPO / "benchmarks/bench_gpu_train.py", "--tiny", "--arms",
                           "512:zero3:no_such_attention", "--conversations", "20", "--work-dir", tmp_path / "work",
                           "--json", out], capture_output=True, text=True, timeout=600, env=subprocess_env())
    assert proc.returncode == 1, proc.stderr[-3000:]
    (arm,) = json.loads(out.read_text())["arms"]
    assert "model.attn_implementation" in arm["error"]


@pytest.mark.slow
def test_serve_gpu_tests_and_bench_serve_need_no_embedded_model(tmp_path):
    """The GPU machine gets the bundle's tokenizer files, never the embedded model: with it unavailable (a plugin
    makes embedded_model_path raise, as offline there), the serving gpu tests run (here on the CPU, as in the
    rehearsal) and bench_serve builds its random model over $DS_VICUNA_TOKENIZER."""
    import importlib.util as iu
    import shutil
    import subprocess

    from ds_vicuna.model.embedded import embedded_model_path
    from tests.support.tiny_llama import subprocess_env

    tokenizer = tmp_path / "tokenizer"
    tokenizer.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (embedded_model_path() / name).is_file():
            shutil.copy2(embedded_model_path() / name, tokenizer / name)
    (tmp_path / "no_embedded.py").write_text(
        "import ds_vicuna.model.embedded as embedded\n\n\ndef missing():\n"
        "    raise FileNotFoundError('the embedded model is not on the GPU machine')\n\n\n"
        "embedded.embedded_model_path = missing\n")
    env = {**subprocess_env(), "DS_VICUNA_TOKENIZER": str(tokenizer), "DS_VICUNA_GPU_TEST_DEVICE": "cpu",
           "DS_VICUNA_CACHE": str(tmp_path / "cache")}
    env["PYTHONPATH"] = f"{tmp_path}{os.pathsep}{env['PYTHONPATH']}"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no_embedded", "-p", "no:cacheprovider", "-q",
                           "-ra", "-m", "gpu", "tests/serve/test_gpu.py"], cwd=REPO, capture_output=True,
                          text=True, timeout=900, env=env)
    assert proc.returncode == 0 and "3 passed" in proc.stdout, proc.stdout[-4000:]
    spec = iu.spec_from_file_location("bench_serve", REPO / "benchmarks" / "bench_serve.py")
    script = ("import sys, importlib.util as iu; import no_embedded; "
              f"spec = iu.spec_from_file_location('b', {str(spec.origin)!r}); b = iu.module_from_spec(spec); "
              "sys.modules['b'] = b; spec.loader.exec_module(b); from pathlib import Path; "
              f"print(b.random_model('tiny', Path({str(tmp_path / 'work')!r})))")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "work" / "random-llama-tiny" / "ds_vicuna.json").is_file()


def test_the_tests_phase_runs_the_modules_with_gpu_tests(gpu_check):
    files = gpu_check.gpu_test_files()
    assert {"tests/train/test_gpu.py", "tests/serve/test_gpu.py", "tests/train/test_packed_attention.py",
            "tests/train/test_loss.py"} <= set(files)
    assert "tests/eval/test_lm_eval.py" not in files and "tests/gpu/test_gpu_check.py" not in files
