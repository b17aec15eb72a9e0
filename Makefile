# django-flyworkers: `make demo` and `make test` are the whole quickstart.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install test test-postgres lint typecheck migrations-check pytest demo run screenshots clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

migrations-check: $(STAMP)
	$(BIN)/python tests/manage.py makemigrations --check --dry-run

pytest: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

test: lint typecheck migrations-check pytest

# The test suite on a throwaway PostgreSQL cluster (needs Debian's `postgresql` package or
# initdb on PATH); `make test` stays on SQLite.
test-postgres: $(STAMP)
	bash .ci/with-postgres $(BIN)/pytest $(PYTEST_ARGS)

# The sandbox on real local parts: embedded Redis, the Machines API emulator, worker processes.
# DEMO_JOBS=N changes the number of jobs; `make run` keeps everything up for the admin.
demo: $(STAMP)
	$(BIN)/python sandbox_project/rundemo.py

run: $(STAMP)
	$(BIN)/python sandbox_project/rundemo.py --serve

# Photographs of the admin dashboard for the README: drives the sandbox (needs chromium).
screenshots: $(STAMP)
	$(BIN)/python sandbox_project/screenshots.py --out docs

clean:
	rm -rf $(VENV) .test-db .mypy_cache .ruff_cache .pytest_cache
