# sendtime: `make run` serves, `make test` tests. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: all run demo test lint gen check-gen bench install clean

all: lint test

$(STAMP): pyproject.toml clients/python/pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ./clients/python -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/sendtime serve

# The same server with demo flows that fire in seconds (demo/sendtime.toml).
demo: $(STAMP)
	$(BIN)/sendtime serve --config demo/sendtime.toml

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/buf lint
	$(BIN)/python tools/gen_protos.py --check
	$(BIN)/python tools/gen_example_config.py --check

gen: $(STAMP)
	$(BIN)/python tools/gen_protos.py
	$(BIN)/python tools/gen_example_config.py
	$(BIN)/buf lint

# Every benchmark, then benchmarks/report/: JSON results, PNG plots, README.md (several minutes).
bench: $(STAMP)
	$(BIN)/python -m benchmarks.report --run

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
