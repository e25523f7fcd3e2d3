# Two commands do all the set-up on a fresh machine (see README "Quick start"):
#   make demo   install, then segment the bundled sample with the bundled model
#   make test   install, then run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.thinseg-installed

.PHONY: demo test install bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/thinseg segment Resources/Sample/sample_PP.jpg --output results/sample --overlay --probabilities --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python bench/bench_segment.py

clean:
	rm -rf results bench/out .pytest_cache
