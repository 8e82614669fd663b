# sitegen-worker: `make demo` generates a site end to end; `make test` runs the whole suite.
# Both work from a fresh clone: they create .venv, install the project with its test and
# local-services extras, and start throwaway PostgreSQL and Redis themselves.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install quality-tools demo demo-serve test lint typecheck pytest soak services clean bench bench-sse

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "sitegen-worker needs Python 3.11 or newer; set PYTHON=python3.11 (or newer)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,services]'
	@touch $(STAMP)

install: $(STAMP)

## Chromium, the HTML validator and axe-core, for the site-quality tests and the demo's screenshot.
## Best effort: a step that cannot run here prints a warning, and what needs it skips with the reason.
quality-tools: install
	scripts/install-quality-tools.sh

## Generate the sample site with live progress (local services unless DATABASE_URL and REDIS_URL are set).
demo: install quality-tools
	$(BIN)/sitegen demo

## `make demo`, then the dashboard and API on the demo's services (URL and a demo token printed) until Ctrl-C.
demo-serve: install quality-tools
	$(BIN)/sitegen demo --serve

## Lint, type-check and run every test against real PostgreSQL and Redis.
test: lint typecheck pytest

lint: install
	$(BIN)/ruff check worker tests bench

typecheck: install
	$(BIN)/mypy worker

## The suite on PYTEST_WORKERS pytest-xdist workers, each with its own throwaway PostgreSQL and Redis (5: the tests
## mostly wait on processes and servers, so 5 keep 2 cores busy; 3 left them a third idle);
## the longest tests start first and the fault suite runs one scenario at a time (tests/conftest.py).
## PYTEST_WORKERS=0 runs it in one process.
PYTEST_WORKERS ?= 5
pytest: install quality-tools
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadgroup --no-loadscope-reorder

## The chaos soak alone for SOAK_S seconds of faults (default 120; `make soak SOAK_S=600`), its summary printed;
## SOAK_SEED=<seed printed by a run> replays that run's fault plan.
SOAK_S ?= 120
soak: install
	SOAK_S=$(SOAK_S) SOAK_SEED=$(SOAK_SEED) $(BIN)/pytest tests/faults/test_chaos.py -s -q -p no:cacheprovider

## Throwaway PostgreSQL + Redis in the foreground; prints DATABASE_URL / REDIS_URL to export.
services: install
	$(BIN)/python -m worker.local.services

## Benchmarks against real worker processes: writes bench/results/RESULTS.md and charts (BENCH_ARGS=--check ...),
## then the sse scenario (bench/results/SSE.md; SSE_ARGS for its options).
bench: install
	$(BIN)/pip install --quiet --disable-pip-version-check matplotlib py-spy
	$(BIN)/python -m bench.run $(BENCH_ARGS)
	$(BIN)/python -m bench.sse $(SSE_ARGS)

## The sse scenario alone: 1,000 SSE clients on one `sitegen serve` while generations run (bench/results/SSE.md).
bench-sse: install
	$(BIN)/python -m bench.sse $(SSE_ARGS)

clean:
	rm -rf $(VENV) generated_sites .pytest_cache .mypy_cache .ruff_cache
