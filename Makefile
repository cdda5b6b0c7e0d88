# livecomments: `make` lists the targets. Every target bootstraps .venv on its own.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: help run test lint fmt bench bench-quick clean

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  make %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): setup.cfg pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

run: $(STAMP) ## Start the service on SQLite (no other service needed) and print its URL
	$(BIN)/livecomments serve

test: $(STAMP) ## Run the whole test suite, fault tests included
	$(BIN)/python -m pytest

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,bench]'
	@touch $(BENCH_STAMP)

bench: $(BENCH_STAMP) ## Benchmarks vs python-socketio (< 10 min); writes bench/results/ and BENCHMARKS.md
	$(BIN)/python -m bench.run

bench-quick: $(BENCH_STAMP) ## A smaller run of every benchmark scenario (< 60 s)
	$(BIN)/python -m bench.run --quick

lint: $(STAMP) ## ruff and mypy --strict
	$(BIN)/ruff check livecomments tests bench
	$(BIN)/ruff format --check livecomments tests bench
	$(BIN)/mypy

fmt: $(STAMP) ## Format the code with ruff
	$(BIN)/ruff format livecomments tests bench
	$(BIN)/ruff check --fix livecomments tests bench

clean: ## Remove the virtualenv and local data
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache
