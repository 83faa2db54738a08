# Two commands from a fresh machine: `make demo` runs the bridge, `make test` runs the tests.
# Both create the virtualenv and install what is needed on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo run test lint bench bench-smoke clean compose-secrets

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

## the bridge against the built-in simulator and the local RabbitMQ, with a live tail
demo: $(STAMP)
	$(BIN)/orangepill-bridge demo

## the bridge against the real stream: set ORANGEPILL_REALM_KEY first
run: $(STAMP)
	$(BIN)/orangepill-bridge run

## the whole test suite (needs RabbitMQ on 127.0.0.1:5672), then ruff and mypy
test: $(STAMP)
	$(BIN)/ruff check bridge tests bench
	$(BIN)/mypy bridge
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check bridge tests bench
	$(BIN)/mypy bridge

bench: $(STAMP)
	$(BIN)/python -m bench

## .env and secrets/ for docker compose (random passwords; existing files are kept)
compose-secrets:
	deploy/compose-secrets.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache bridge-spool.db*
