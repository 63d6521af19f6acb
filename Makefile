# Two entry points a new user needs: `make train` and `make test`. Both create .venv if missing.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
DATA ?= $(abspath ../shared/data)
STAMP := $(VENV)/.installed

.PHONY: install train test test-fast lint bench clean

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null || { echo "error: $(PY) not found; install Python 3.11 or run make PY=python3"; exit 2; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first: 2.13.0 is the CPU build; an unpinned torch would pull a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	MTL_RAY_DATA_DIR=$${MTL_RAY_DATA_DIR:-$(DATA)} $(BIN)/mtl-ray train jobs/configs/omniglot_maml.yaml $(ARGS)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	MTL_RAY_DATA_DIR=$${MTL_RAY_DATA_DIR:-$(DATA)} $(BIN)/pytest -q --durations=10

test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python bench/throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache
