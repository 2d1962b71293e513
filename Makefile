# The two commands a new user needs:  `make demo`  and  `make test`.
# Both create ./.venv on first use with the CPU build of torch and triton 3.6.0 (the GPU image's version),
# so the Triton interpreter runs the real kernels and the compile report proves what the GPU compiles.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv test test-all lint format demo compile-report bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0 triton==3.6.0 "numpy<2.4"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The CPU suite: Triton kernels in the interpreter, everything else on the CPU. GPU and slow tests are skipped.
test: $(STAMP) lint
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -m "not gpu and not slow" $(PYTEST_ARGS)

test-all: $(STAMP)
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -m "not gpu" $(PYTEST_ARGS)

compile-report: $(STAMP)
	$(BIN)/python -m benchmarks.compile_report

# The quick benchmark suite on whatever device is present (CUDA if available); results under benchmarks/results/.
bench: $(STAMP)
	PYTHONPATH=. $(BIN)/python -m benchmarks.run --suite quick
	PYTHONPATH=. $(BIN)/python -m benchmarks.report

demo: $(STAMP)
	$(BIN)/asu demo

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
