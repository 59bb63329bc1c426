# Entry points:
#   make venv   create (or reuse) .venv and install requirements-dev.txt; skipped while the requirements are unchanged
#   make test   the test suite; tests that need the full data skip unless VAE_TRACIN_DATA points at it
#               (e.g. VAE_TRACIN_DATA=../shared/data make test)
#   make demo   train a small VAE on the shipped demo data and run the three VAE-TracIn experiments (CPU, minutes)
SHELL := bash
BOOT_PYTHON ?= python3
VENV ?= .venv
PYTHON := $(VENV)/bin/python
# Touched after a successful install; older than a requirements file means "install again".
STAMP := $(VENV)/.requirements-installed

.PHONY: venv test demo

venv: $(STAMP)

# No --upgrade: pip installs what is missing or pinned differently and leaves satisfied packages (torch) alone.
$(STAMP): requirements.txt requirements-dev.txt
	@test -x $(PYTHON) || $(BOOT_PYTHON) -m venv $(VENV)
	$(PYTHON) -m pip install --progress-bar off -r requirements-dev.txt
	@touch $@

test: $(STAMP)
	$(PYTHON) -m pytest -q

demo: $(STAMP)
	VAE_TRACIN_DATA=demo/data PYTHON=$(PYTHON) bash demo/run_demo.sh
