# The two commands of the README's quick start: `make demo` and `make test`. Each installs into .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test test-fast

install: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

demo: install
	$(PY) tools/demo.py $(DEMO_ARGS)

# The whole suite (fast tier + slow end-to-end tests).
test: install
	$(PY) -m pytest

# Fast tier only (at most a few minutes): the slow end-to-end tests are deselected.
test-fast: install
	$(PY) -m pytest -m "not slow"
