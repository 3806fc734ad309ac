# The two set-up commands: `make demo` and `make test`. Both build the virtual
# environment on first use; nothing needs installing by hand.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo
# The CPU build of PyTorch (served from local disk on the project's machines);
# an unpinned torch would pull a CUDA build of several GB.
TORCH_CPU ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install demo readme test lint format clean check-python

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# pip itself and the CPU build of PyTorch (unless a torch is already there).
define install_base
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_CPU)"
endef

# Everything (tests, every extra, Triton for the interpreter tests).
$(STAMP): pyproject.toml | $(BIN)/python
	$(install_base)
	$(BIN)/python -m pip install -q -e '.[all]' triton
	touch $(STAMP) $(DEMO_STAMP)

# Only what the demo needs, so that a first `make demo` does not wait for every extra.
$(DEMO_STAMP): pyproject.toml | $(BIN)/python
	$(install_base)
	$(BIN)/python -m pip install -q -e '.[demo]'
	touch $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/dpls demo

# The README's demo section (table and plot) comes from a fresh demo run, never from typing.
README_DEMO := runs/readme-demo
readme: $(STAMP)
	rm -rf $(README_DEMO)
	$(BIN)/dpls demo --quiet --out $(README_DEMO) --readme README.md

# A shipped study's README section, from a fresh run of studies/NAME.toml with two local
# workers: `make readme-data_limited_cpu` (each file's header has its measured time).
readme-%: $(STAMP) studies/%.toml
	rm -rf runs/readme-$*
	$(BIN)/dpls study studies/$*.toml --no-progress --executor local --workers 2 --out runs/readme-$* --readme README.md

test: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/lint-imports
	$(BIN)/mypy
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

format: $(STAMP)
	$(BIN)/ruff check --fix src tests
	$(BIN)/ruff format src tests

# The light check of another Python (no torch needed): install the package into a throwaway
# virtual environment, import it and run the CLI's help. `make check-python PYTHON=python3.13`
CHECK_VENV ?= /tmp/dpls-check-python
check-python:
	rm -rf $(CHECK_VENV)
	$(PYTHON) -m venv $(CHECK_VENV)
	$(CHECK_VENV)/bin/python -m pip install -q --upgrade pip
	$(CHECK_VENV)/bin/python -m pip install -q numpy tqdm
	$(CHECK_VENV)/bin/python -m pip install -q --no-deps -e .
	cd $(CHECK_VENV) && bin/python -c "import sys, dpls; print('import dpls', dpls.__version__, 'on', sys.version.split()[0])"
	$(CHECK_VENV)/bin/dpls --help > /dev/null
	$(CHECK_VENV)/bin/dpls prepare stdlib --help > /dev/null
	@echo "check-python: dpls installs, imports and answers --help on $$($(CHECK_VENV)/bin/python -V)"

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
