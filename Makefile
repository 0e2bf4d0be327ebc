# sendtime: `make run` serves, `make test` tests. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: all run demo test test-fast fuzz lint gen check-gen bench wrk soak install script clean audit

all: lint test

$(STAMP): pyproject.toml clients/python/pyproject.toml constraints.txt tests/interop/node/package-lock.json
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ./clients/python -e '.[dev]'
	@# the Node client of the gRPC interop tests (tests/interop): skipped, saying so, without npm
	@if command -v npm >/dev/null; then npm ci --prefix tests/interop/node --no-audit --no-fund --loglevel=error; \
	else echo "no npm: the Node gRPC interop tests will be skipped"; fi
	@touch $(STAMP)

# The sendtime command is the client's (the server adds serve to it). When an
# upgrade reinstalls the server after the client, pip's removal of the server's
# old files can take the script with it: the client is installed again then.
script: $(STAMP)
	@test -x $(BIN)/sendtime || $(BIN)/python -m pip install --quiet --no-deps --force-reinstall -e ./clients/python

install: script

run: script
	$(BIN)/sendtime serve

# The same server with demo flows that fire in seconds (demo/sendtime.toml).
demo: script
	$(BIN)/sendtime serve --config demo/sendtime.toml

test: $(STAMP)
	$(BIN)/python -m pytest

# Everything but the tests marked slow (subprocess servers, fresh installs,
# PostgreSQL replicas, timing): the domain and the in-process server, in under a minute.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" -q

# The property tests at every door with 2,000 examples each instead of a few dozen (several minutes).
fuzz: $(STAMP)
	FUZZ_EXAMPLES=$${FUZZ_EXAMPLES:-2000} $(BIN)/python -m pytest -q tests/integration/test_surface_fuzz.py tests/integration/test_ingest_fuzz.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/buf lint
	$(BIN)/python tools/gen_protos.py --check
	$(BIN)/python tools/gen_example_config.py --check

# Known vulnerabilities in constraints.txt, from PyPI's vulnerability data
# (tools/audit.py; ops/audit-allowlist.toml lists the ones let through, each with a reason).
audit:
	$(PYTHON) tools/audit.py $(AUDIT_FLAGS)

gen: $(STAMP)
	$(BIN)/python tools/gen_protos.py
	$(BIN)/python tools/gen_example_config.py
	$(BIN)/buf lint

# Every benchmark, then benchmarks/report/: JSON results, PNG plots, README.md (several minutes).
# The ingest and content benchmarks drive the servers with Debian's wrk: installed here when
# missing and run as root with apt-get, else they stop saying how to install it.
bench: $(STAMP) wrk
	$(BIN)/python -m benchmarks.report --run

wrk:
	@command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null); } \
		|| echo "wrk is missing: apt-get install wrk (Debian) before make bench"

# Ten minutes of mixed traffic with a kill -9 in the middle, then an audit (benchmarks/report/soak.*).
soak: $(STAMP)
	$(BIN)/python -m benchmarks.soak --out benchmarks/report

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
