# The two commands of the README's quick start: `make demo` and `make test`. Each installs into .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install install-test demo test test-fast

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

$(VENV)/.installed: setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

# Tests also need torch + taming-transformers for the checkpoint-parity test (taming without its heavy deps).
$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[test,parity]'
	$(PY) -m pip install --quiet --no-deps taming-transformers-rom1504==0.0.6
	touch $@

demo: install
	$(PY) tools/demo.py $(DEMO_ARGS)

# The whole suite (fast tier + slow end-to-end tests).
test: install-test
	$(PY) -m pytest

# Fast tier only: the slow end-to-end tests are deselected.
test-fast: install-test
	$(PY) -m pytest -m "not slow"
