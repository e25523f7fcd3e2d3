# Two commands do all the set-up on a fresh machine (see README "Quick start"):
#   make demo   install, then segment the bundled sample with the bundled model
#   make test   install, then check formatting, lint and types, and run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.thinseg-installed
REQUIREMENTS := ThinSectionSegmentation/thinseg/requirements.txt
DEV_CONSTRAINTS := constraints/dev.txt

# The GeoSlicer 2.8 stack: Python 3.9 with GeoSlicer's own pins (constraints/geoslicer-2.8.txt).
GEO_VENV  ?= .venv-geoslicer
GEO_BIN   := $(GEO_VENV)/bin
GEO_STAMP := $(GEO_VENV)/.thinseg-installed
GEO_CONSTRAINTS := constraints/geoslicer-2.8.txt
# The first candidate that really runs Python 3.9 (a pyenv shim on PATH may exist yet fail to run)
PYTHON39 ?= $(shell for p in $$(command -v python3.9) $$(ls -d $(HOME)/.pyenv/versions/3.9*/bin/python3.9 2>/dev/null | sort -rV); do \
	"$$p" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 9))' >/dev/null 2>&1 && { echo "$$p"; break; }; done)
# Scratch output of the README demo run on the GeoSlicer stack
GEO_DEMO_OUT ?= results/geoslicer-demo

.PHONY: demo test lint install bench clean geoslicer-env test-main test-geoslicer demo-geoslicer

$(STAMP): pyproject.toml $(REQUIREMENTS) $(DEV_CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c $(DEV_CONSTRAINTS) -e ".[test,cluster,encoders]"
	touch $(STAMP)

install: $(STAMP)

# GeoSlicer's pins first, then thinseg with those pins as constraints: what GeoSlicer lacks (SimpleITK,
# tifffile, imagecodecs, ...) is added, nothing GeoSlicer pins moves; check_pins.py proves it.
$(GEO_STAMP): pyproject.toml $(REQUIREMENTS) $(GEO_CONSTRAINTS) constraints/check_pins.py
	@test -n "$(PYTHON39)" || { echo "error: Python 3.9 not found (neither python3.9 on PATH nor ~/.pyenv/versions/3.9*/bin/python3.9); install it or pass PYTHON39=/path/to/python3.9" >&2; exit 1; }
	@$(PYTHON39) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 9))' || { echo "error: $(PYTHON39) is not Python 3.9" >&2; exit 1; }
	$(PYTHON39) -m venv $(GEO_VENV)
	$(GEO_BIN)/python -m pip install --quiet -r $(GEO_CONSTRAINTS)
	$(GEO_BIN)/python -m pip install --quiet -c $(GEO_CONSTRAINTS) -e . pytest
	$(GEO_BIN)/python -m pip check
	$(GEO_BIN)/python constraints/check_pins.py $(GEO_CONSTRAINTS)
	touch $(GEO_STAMP)

geoslicer-env: $(GEO_STAMP)

demo: $(STAMP)
	$(BIN)/thinseg segment Resources/Sample/sample_PP.jpg --output results/sample --overlay --probabilities --overwrite

# ruff (format and lint) over every Python file, mypy --strict over the core library (pyproject.toml)
lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

# The main suite; its cross-stack tests run the GeoSlicer interpreter named here.
test-main: $(STAMP) $(GEO_STAMP)
	THINSEG_GEOSLICER_PYTHON="$(abspath $(GEO_BIN)/python)" $(BIN)/python -m pytest

# The fast part of the suite on GeoSlicer's stack: what needs slicer-core/PySide6 skips there.
test-geoslicer: $(GEO_STAMP)
	$(GEO_BIN)/python -m pytest -p no:cacheprovider -m "not slow" -W "ignore::DeprecationWarning:monai.utils.module"

# The README demo with the GeoSlicer stack's own `thinseg`
demo-geoslicer: $(GEO_STAMP)
	rm -rf $(GEO_DEMO_OUT)
	$(GEO_BIN)/thinseg segment Resources/Sample/sample_PP.jpg --output $(GEO_DEMO_OUT) --overlay --probabilities --overwrite

test: lint
	$(MAKE) test-main
	$(MAKE) test-geoslicer
	$(MAKE) demo-geoslicer

bench: $(STAMP)
	$(BIN)/python bench/bench_segment.py

clean:
	rm -rf results bench/out .pytest_cache .mypy_cache .ruff_cache
