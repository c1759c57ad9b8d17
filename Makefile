# imagemesh — every task a developer or CI runs, the same everywhere.
#   make demo     create the venv, start the mesh on embedded defaults, run the end-to-end flow
#   make test     install what tests need, then lint, check stubs and run every test
#   make protos   regenerate the Python, Go and TypeScript code from protos/
#   make lint     ruff (format + lint), mypy, buf lint
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Caches shared by every clone on this machine (tools, engines), outside the work tree.
export IMAGEMESH_CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/imagemesh
export IMAGEMESH_PYTHON := $(abspath $(PY))
PYTEST_ARGS ?=

include deploy/local/engines.mk

.PHONY: help venv tools ts-client protos check-protos lint format test test-fast demo bench clean

help:
	@grep -E '^#   make' $(MAKEFILE_LIST) | sed 's/^#   //'

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip==25.3
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	@touch $@

tools:
	@bash deploy/local/tools.sh install

# The TypeScript client's npm packages (skipped when installed from the same lock) and its build.
ts-client:
	bash scripts/build_ts.sh build

protos: venv
	bash scripts/gen_protos.sh
	bash scripts/gen_go.sh
	bash scripts/gen_ts.sh

# Regenerates into a scratch folder and compares: committed stubs must match the protos.
check-protos: venv
	@tmp=$$(mktemp -d); bash scripts/gen_protos.sh "$$tmp" >/dev/null; \
	if diff -r -q -x '__pycache__' "$$tmp/imagemesh" imagemesh | grep -E '_pb2|__init__' | grep -v '^Only in imagemesh: [a-z_]*\.py$$' | grep -v '^Only in imagemesh: \(py.typed\|__pycache__\)'; then \
		echo "generated code is stale: run 'make protos' and commit"; rm -rf "$$tmp"; exit 1; \
	fi; bash scripts/gen_go.sh "$$tmp/go" >/dev/null; \
	if ! diff -r -q "$$tmp/go" clients/go/gen; then \
		echo "generated Go code is stale: run 'make protos' and commit"; rm -rf "$$tmp"; exit 1; \
	fi; bash scripts/gen_ts.sh "$$tmp/ts" >/dev/null; \
	if ! diff -r -q "$$tmp/ts" clients/ts/gen; then \
		echo "generated TypeScript code is stale: run 'make protos' and commit"; rm -rf "$$tmp"; exit 1; \
	fi; rm -rf "$$tmp"; echo "generated code is up to date"

lint: venv tools
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	cd protos && "$$(bash ../deploy/local/tools.sh path buf)" lint
	cd clients/go && test -z "$$(gofmt -l .)" && go vet ./...
	bash scripts/build_ts.sh install && cd clients/ts && node_modules/.bin/tsc -p . --noEmit

format: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# Starts the engines that are down, runs every test, and stops what it started.
test: venv tools lint check-protos
	bash scripts/with_engines.sh $(PY) -m pytest $(PYTEST_ARGS)

# Tests that need no engine, for a quick loop while editing.
test-fast: venv
	$(PY) -m pytest -m "not engines" $(PYTEST_ARGS)

demo: venv
	$(PY) scripts/demo.py

# Every bench in its --quick mode, with the engines they need up (bench/cpu_meter.py is a helper).
BENCHES := storage search inference inference_paired batch train
bench: venv tools
	bash scripts/with_engines.sh sh -c 'for b in $(BENCHES); do $(PY) -m bench.$$b --quick || exit 1; done'

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
