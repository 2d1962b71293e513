# The two commands a new user needs:  `make demo`  and  `make test`.
# Both create ./.venv on first use with the CPU build of torch and triton 3.6.0 (the GPU image's version),
# so the Triton interpreter runs the real kernels and the compile report proves what the GPU compiles.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv test test-all test-matrix matrix-venvs matrix-newest matrix-floor matrix-gpu-image lint format demo \
	compile-report bench clean

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

# ---------------------------------------------------------------------------------------------------------
# The version matrix (`make test-matrix`, run by .ci/run after `make test`). Each job has its own venv,
# created from scratch (the folder is removed first) whenever pyproject.toml or this Makefile changes, so a
# fresh clone builds every one. The pins are the tested combinations listed in the README.
#   newest:    the newest triton, transformers and numpy on PyPI (with CPU torch 2.13)
#   floor:     every direct dependency at the floor pyproject.toml declares (CPU torch 2.13: see the README)
#   gpu-image: the GPU image's torch 2.11 / triton 3.6.0 / transformers 5.17 (torch 2.11 from PyPI is the
#              CUDA build; it runs on the CPU here)
# `torch==2.13.0` resolves to the CPU wheel on this machine's disk; a plain `torch` would pull a CUDA build.
NEWEST_PINS    := torch==2.13.0 triton==3.9.0 transformers==5.24.0 numpy==2.4.6
FLOOR_PINS     := torch==2.13.0 triton==3.6.0 transformers==5.4.0 tokenizers==0.22.1 safetensors==0.4.3 \
	tqdm==4.66.3 rouge-score==0.1.2 scipy==1.10.0 matplotlib==3.8.0 peft==0.18.0 accelerate==1.3.0 \
	datasets==4.0.0 pyarrow==15.0.0 hypothesis==6.100.0
GPU_IMAGE_PINS := torch==2.11.0 triton==3.6.0 transformers==5.17.0 "numpy<2.4"

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

# $(call matrix_venv,DIR,PINS): DIR/.installed, a venv with PINS and the package (editable, dev extras).
# --no-compile: no .pyc for the whole of torch up front (CPU time CI needs for the tests); imports compile
# what they use.
define matrix_venv
$(1)/.installed: pyproject.toml Makefile
	rm -rf $(1)
	$(PY) -m venv $(1)
	$(1)/bin/python -m pip install -q --no-compile --upgrade pip
	$(1)/bin/python -m pip install -q --no-compile $(2) -e ".[dev]"
	touch $$@
endef
$(eval $(call matrix_venv,.venv-newest,$(NEWEST_PINS)))
$(eval $(call matrix_venv,.venv-floor,$(FLOOR_PINS)))
$(eval $(call matrix_venv,.venv-gpu-image,$(GPU_IMAGE_PINS)))

# Prints the versions a job runs with, so the CI log shows the combination.
VERSIONS := -c "import platform; from asu.environment import library_versions as v; \
	print('python', platform.python_version(), v(('torch', 'triton', 'transformers', 'tokenizers', 'numpy', 'peft', 'accelerate')))"

# --allow-spills in the newest job: under triton 3.9 a few h100 candidates spill on sm_90 (see the README); the
# job checks that every configuration compiles.
matrix-newest: .venv-newest/.installed
	.venv-newest/bin/python $(VERSIONS)
	TRITON_INTERPRET=1 .venv-newest/bin/python -m pytest $(MATRIX_PYTEST) $(KERNEL_TESTS) $(HF_TESTS) $(FAMILY_TESTS)
	.venv-newest/bin/python -m benchmarks.compile_report --quick --allow-spills

matrix-floor: .venv-floor/.installed
	.venv-floor/bin/python $(VERSIONS)
	TRITON_INTERPRET=1 .venv-floor/bin/python -m pytest $(MATRIX_PYTEST) $(HF_TESTS)

matrix-gpu-image: .venv-gpu-image/.installed
	.venv-gpu-image/bin/python $(VERSIONS)
	TRITON_INTERPRET=1 .venv-gpu-image/bin/python -m pytest $(MATRIX_PYTEST) $(HF_TESTS) $(FAMILY_TESTS)

# The venvs alone: .ci/run builds them in the background while `make test` runs.
matrix-venvs: .venv-newest/.installed .venv-floor/.installed .venv-gpu-image/.installed

test-matrix: matrix-newest matrix-floor matrix-gpu-image

compile-report: $(STAMP)
	$(BIN)/python -m benchmarks.compile_report

# The quick benchmark suite on whatever device is present (CUDA if available); results under benchmarks/results/.
bench: $(STAMP)
	PYTHONPATH=. $(BIN)/python -m benchmarks.run --suite quick
	PYTHONPATH=. $(BIN)/python -m benchmarks.report

demo: $(STAMP)
	$(BIN)/asu demo

clean:
	rm -rf $(VENV) .venv-newest .venv-floor .venv-gpu-image .pytest_cache .ruff_cache *.egg-info
