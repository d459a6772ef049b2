# Benchmarks: real twistd members over mutual TLS on 127.0.0.1, against a bare-AMP baseline
# measured in the same run. Prints a table and writes bench/results.json (docs/benchmarks.md).
# On a fresh clone the first run makes .venv and installs the project into it (under a minute).
VENV_PYTHON := .venv/bin/python
PYTHON ?= $(VENV_PYTHON)
NEEDS_VENV := $(if $(filter $(VENV_PYTHON),$(PYTHON)),$(VENV_PYTHON))

.PHONY: bench bench-quick bench-profile

$(VENV_PYTHON):
	python3 -m venv .venv
	$(VENV_PYTHON) -m pip install -q '.[test]'

bench: $(NEEDS_VENV)
	$(PYTHON) bench/run.py

bench-quick: $(NEEDS_VENV)
	$(PYTHON) bench/run.py --quick

bench-profile: $(NEEDS_VENV)
	$(PYTHON) bench/run.py --only checkout,heartbeat --profile --output bench/results-profile.json
