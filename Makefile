# sitegen-worker: `make demo` generates a site end to end; `make test` runs the whole suite.
# Both work from a fresh clone: they create .venv, install the project with its test and
# local-services extras, and start throwaway PostgreSQL and Redis themselves.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install demo test lint typecheck pytest services clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "sitegen-worker needs Python 3.11 or newer; set PYTHON=python3.11 (or newer)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,services]'
	@touch $(STAMP)

install: $(STAMP)

## Generate the sample site with live progress (local services unless DATABASE_URL and REDIS_URL are set).
demo: install
	$(BIN)/sitegen demo

## Lint, type-check and run every test against real PostgreSQL and Redis.
test: lint typecheck pytest

lint: install
	$(BIN)/ruff check worker tests

typecheck: install
	$(BIN)/mypy worker

pytest: install
	$(BIN)/pytest

## Throwaway PostgreSQL + Redis in the foreground; prints DATABASE_URL / REDIS_URL to export.
services: install
	$(BIN)/python -m worker.services

clean:
	rm -rf $(VENV) generated_sites .pytest_cache .mypy_cache .ruff_cache
