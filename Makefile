# The two commands a new machine needs are `make demo` and `make test` (see README.md); `make
# bench` and `make scale` measure.
# Each installs what it needs first: Python packages into .venv, Debian's redis-server and
# postgresql when missing (localrun.servers does that, and starts the servers itself).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench scale lint install services-up services-down clean

demo: $(STAMP)
	$(BIN)/python -m engine.cli demo

# The benchmark: engine vs a bare-Starlette ceiling vs a Postgres baseline, report in
# bench-report/ (flashsale bench apt-gets Debian's wrk when it is missing).
bench: $(STAMP)
	$(BIN)/python -m localrun.servers install
	$(BIN)/python -m engine.cli bench --out bench-report

# The scale program: the worker's CPU and memory and the ledger's lag with 100,000 live holds,
# then under 1,000 orders/s for 5 minutes (about 8 minutes), report in scale-report/.
scale: $(STAMP)
	$(BIN)/python -m localrun.servers install
	$(BIN)/python -m loadtests.scale --out scale-report/report.json

test: $(STAMP)
	$(BIN)/python -m localrun.servers install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

services-up: $(STAMP)
	$(BIN)/python -m localrun.servers up

services-down: $(STAMP)
	$(BIN)/python -m localrun.servers down

clean: services-down
	rm -rf .flashsale
