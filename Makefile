# Every target installs what it needs itself: a fresh machine needs only Python 3.11 and make.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PROTOS := $(wildcard proto/subsidy/v1/*.proto)

.DEFAULT_GOAL := help
.PHONY: help run test smoke proto proto-check lint bench bench-quick fuzz chaos clean venv

help: ## list every target
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP) ## create .venv and install the project with its dev tools

proto: $(STAMP) ## regenerate the committed protobuf/gRPC code from proto/
	$(PY) -m subsidyctl.proto generate

proto-check: $(STAMP) ## fail if the committed generated code is stale
	$(PY) -m subsidyctl.proto check

run: $(STAMP) ## start the whole stack locally, seed a demo campaign, print the dashboard URL, serve until Ctrl-C
	$(VENV)/bin/subsidyctl up --seed-demo

smoke: $(STAMP) ## start the stack, run one checkout as a platform would, print one JSON line, stop
	$(VENV)/bin/subsidyctl smoke

test: $(STAMP) proto-check ## run every test CI runs (real PostgreSQL, NATS, OpenBao)
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP) ## ruff and mypy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy services subsidyctl tests bench

bench: $(STAMP) ## every benchmark, one table; results in bench/results/ (QUICK=1: a smoke run)
	$(PY) -m pip install --quiet -e '.[dev,bench]'  # the event store benchmark's peer
	$(PY) -m bench $(if $(QUICK),--quick)

bench-quick: $(STAMP) ## every benchmark at small sizes, each under a minute; bench/results/quick/
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	$(PY) -m bench --quick

# The long fuzz run (CI runs the short one in `make test`): a fresh seed each run unless
# SUBSIDY_FUZZ_SEED is given; SUBSIDY_FUZZ_ONLY=<Method> fuzzes only the matching RPCs.
fuzz: $(STAMP) ## fuzz every RPC of every service, 10,000 requests per service; prints the seed and a summary
	@seed=$${SUBSIDY_FUZZ_SEED:-$$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}; \
	echo "fuzz seed $$seed (replay: make fuzz SUBSIDY_FUZZ_SEED=$$seed)"; \
	SUBSIDY_FUZZ_SEED=$$seed SUBSIDY_FUZZ_REQUESTS=$${SUBSIDY_FUZZ_REQUESTS:-10000} \
	$(PY) -m pytest -q -s -p no:cacheprovider -o log_level=ERROR tests/fuzz

# The long chaos run (CI runs the short one in `make test`): random fault injections over every
# process under a checkout load; a fresh seed each run unless SUBSIDY_CHAOS_SEED is given.
chaos: $(STAMP) ## kill -9 / pause / outage every process at random, 100 times, under checkouts; prints the seed and a report
	@seed=$${SUBSIDY_CHAOS_SEED:-$$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}; \
	echo "chaos seed $$seed (replay: make chaos SUBSIDY_CHAOS_SEED=$$seed)"; \
	SUBSIDY_CHAOS_SEED=$$seed $(PY) -m tests.chaos --injections $${SUBSIDY_CHAOS_INJECTIONS:-100} \
	$${SUBSIDY_CHAOS_REPORT:+--report $$SUBSIDY_CHAOS_REPORT}

clean: ## remove the virtual environment and local run data
	rm -rf $(VENV) run var .pytest_cache .mypy_cache .ruff_cache
