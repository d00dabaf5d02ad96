"""benchmarks/gpu_check.py without a GPU: what the bundle must hold, which wheel files fit the GPU machine, and
the report of a suite that skipped (what `make gpu-check` writes on a machine without CUDA)."""
import importlib.util
import json

import pytest

from tests.support.tiny_llama import REPO


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
    report = {"started": "now", "host": "box", "seconds": 3.0, "tests": tests,
              "environment": {"torch": "2.13.0+cpu", "cuda_available": False, "python": "3.12.3"},
              "phases": [{"phase": "tests", "rc": 0, "seconds": 2.5, "timed_out": False, "log": "tests.log"}],
              "bench_train": {"model": "m", "arms": [
                  {"max_length": 4096, "deepspeed": "zero3", "attn": "sdpa", "steps_timed": 17,
                   "tokens_per_s": 30000.0, "mfu": 0.41, "peak_gib": 50.2},
                  {"max_length": 4096, "deepspeed": "zero3", "attn": "flex_attention", "error": "exit 1: boom"}]}}
    md_path, json_path = gpu_check.write_report(tmp_path, report)
    text = md_path.read_text()
    assert text.startswith("# ds-vicuna GPU check: no CUDA device")
    assert "0 passed, 0 failed, 0 errors, 2 skipped" in text and "needs a CUDA GPU" in text
    assert "| 4096 | zero3 | sdpa | 17 | 30000 | 41.0% | 50.2 |" in text and "exit 1: boom" in text
    assert json.loads(json_path.read_text())["tests"] == tests


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
