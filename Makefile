# The two set-up commands: `make demo` and `make test`. Both build the virtual
# environment on first use; nothing needs installing by hand.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The CPU build of PyTorch (served from local disk on the project's machines);
# an unpinned torch would pull a CUDA build of several GB.
TORCH_CPU ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install demo readme test lint format clean

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_CPU)"
	$(BIN)/python -m pip install -q -e '.[all]' triton
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/dpls demo

# The README's demo section (table and plot) comes from a fresh demo run, never from typing.
README_DEMO := runs/readme-demo
readme: $(STAMP)
	rm -rf $(README_DEMO)
	$(BIN)/dpls demo --quiet --out $(README_DEMO) --readme README.md

test: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/lint-imports
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

format: $(STAMP)
	$(BIN)/ruff check --fix src tests
	$(BIN)/ruff format src tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
