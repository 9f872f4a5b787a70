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
# GPU share per simulated node (auto: the visible GPUs shared among the nodes at once)
NUM_GPUS ?= auto
# HOST:PORT of a running Ray cluster to simulate on (empty: a local Ray, started and stopped)
RAY_ADDRESS ?=
FLWR_HOME_DIR := $(CURDIR)/.flwr_home
# Tests that need no simulation, no browser and no network namespace.
FAST_TESTS := -m "not slow"

.PHONY: setup system-deps demo test test-fast lint bench dashboard clean gpu-check

setup: $(STAMP)

$(STAMP): pyproject.toml
	@tools/setup_venv.sh "$(PYTHON)" "$(VENV)"
	@touch $(STAMP)

# Debian packages the tests use (chromium, iproute2, dataset-fashion-mnist):
# installed when missing and running as root; otherwise their tests are skipped.
system-deps:
	@tools/system_deps.sh

# `fedcoord run` (python -m server.ui.cli: this folder's code). Its exit code says how the
# run ended (0 completed, 1 failed, 2 bad config, 3 stopped, 130 Ctrl-C); make shows it as
# "Error N" and itself exits 2 on any failure: scripts call `.venv/bin/fedcoord run`.
demo: setup
	@$(BIN)/python -m server.ui.cli run --supernodes $(SUPERNODES) --num-cpus $(NUM_CPUS) \
		--num-gpus $(NUM_GPUS) $(if $(RAY_ADDRESS),--ray-address $(RAY_ADDRESS)) \
		--flwr-home $(FLWR_HOME_DIR) --run-config "$(RUN_CONFIG)"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy strategies server client task --ignore-missing-imports

test: lint system-deps
	$(BIN)/python -m pytest -ra tests

# Budget: under 60 s on a 2-core machine (README); the five slowest tests are named at the end.
test-fast: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q $(FAST_TESTS) --durations=5 tests

bench: setup
	$(BIN)/python bench/client_training.py
	$(BIN)/python bench/aggregation.py
	$(BIN)/python bench/demo_breakdown.py
	$(BIN)/python bench/coordinator_round_time.py
	$(BIN)/python bench/deployment.py
	$(BIN)/python bench/scale.py
	$(BIN)/python bench/async.py
	$(BIN)/python bench/privacy.py

# On a CUDA machine: the gpu tests, bench/gpu.py and a 2-node GPU deployment, one table.
# Without CUDA: one line, exit 2. Needs no flwr for the first two (tools/gpu_bundle.sh).
gpu-check:
	@tools/gpu_check.sh

dashboard: setup
	$(BIN)/fedcoord dashboard

clean:
	rm -rf $(FLWR_HOME_DIR) .pytest_cache .ruff_cache .mypy_cache
