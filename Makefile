# fedtune: `make demo` runs the built-in simulated federation, `make test` runs the test suite.
# Both create .venv on first use (torch 2.13.0 CPU first, then the project) and are quick afterwards.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedtune-installed
export FLWR_TELEMETRY_ENABLED := 0
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-slow test-all bench lint protos clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	PY=$(BIN)/python EDITABLE=1 EXTRAS=dev,ray,privacy bash scripts/install.sh
	touch $(STAMP)

install: $(STAMP)

# --overwrite: each `make demo` replaces the previous demo's run folder (runs/quickstart) instead of refusing it
demo: $(STAMP)
	$(BIN)/fedtune simulate --overwrite simulations/quickstart.toml

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not gpu" -x --timeout 600

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow and not gpu and not bench and not long" --timeout 1800

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "not gpu" --timeout 1800

bench: $(STAMP)
	$(BIN)/python benchmarks/local_step.py
	$(BIN)/python benchmarks/aggregate.py
	$(BIN)/python benchmarks/transport.py

lint: $(STAMP)
	$(BIN)/ruff check fedtune tests benchmarks

protos: $(STAMP)
	bash scripts/gen_protos.sh

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
