# Two entry points for a fresh clone: `make run` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint venv clean loadtest

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "needs Python 3.11+ on PATH (python3.11 or python3)"; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "needs Python 3.11+; $(PYTHON) is $$($(PYTHON) --version 2>&1) (set PYTHON=/path/to/python3.11)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/hubgate dev $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests loadtests
	$(BIN)/ruff format --check src tests loadtests
	$(BIN)/mypy

test: $(STAMP)
	bash scripts/test-deps.sh
	$(MAKE) lint
	$(BIN)/pytest

# Local load test with locust (see loadtests/README.md), e.g. make loadtest ARGS="--users 50 --duration 60s"
loadtest: $(STAMP)
	$(BIN)/pip install -q -e '.[load]'
	$(BIN)/python loadtests/run_locust.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build dist src/*.egg-info
