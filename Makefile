# Two commands do all the set-up on a fresh machine (see README "Quick start"):
#   make demo   install, then segment the bundled sample with the bundled model
#   make test   install, then check formatting, lint and types, and run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.thinseg-installed
REQUIREMENTS := ThinSectionSegmentation/thinseg/requirements.txt

.PHONY: demo test lint install bench clean

$(STAMP): pyproject.toml $(REQUIREMENTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/thinseg segment Resources/Sample/sample_PP.jpg --output results/sample --overlay --probabilities --overwrite

# ruff (format and lint) over every Python file, mypy --strict over the core library (pyproject.toml)
lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python bench/bench_segment.py

clean:
	rm -rf results bench/out .pytest_cache .mypy_cache .ruff_cache
