# fedcoord: make demo | make test | make bench
# The venv is created on first use from pyproject.toml (pip: it finds the torch
# wheels a machine keeps locally; uv/poetry would download them).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedcoord-installed
SUPERNODES ?= 10
RUN_CONFIG ?=
NUM_CPUS ?= 1
FLWR_HOME_DIR := $(CURDIR)/.flwr_home

.PHONY: setup demo test lint bench dashboard clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "fedcoord needs Python >= 3.11 (Flower 1.42)")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: setup
	$(BIN)/python -m server.simulation --supernodes $(SUPERNODES) --num-cpus $(NUM_CPUS) \
		--flwr-home $(FLWR_HOME_DIR) --run-config "$(RUN_CONFIG)"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy strategies --ignore-missing-imports

test: lint
	$(BIN)/python -m pytest -ra tests

bench: setup
	$(BIN)/python bench/client_training.py
	$(BIN)/python bench/aggregation.py
	$(BIN)/python bench/demo_breakdown.py
	$(BIN)/python bench/coordinator_round_time.py
	$(BIN)/python bench/deployment.py

dashboard: setup
	$(BIN)/fedcoord dashboard

clean:
	rm -rf $(FLWR_HOME_DIR) .pytest_cache .ruff_cache .mypy_cache
