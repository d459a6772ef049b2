# Benchmarks: real twistd members over mutual TLS on 127.0.0.1, against a bare-AMP baseline
# measured in the same run. Prints a table and writes bench/results.json (docs/benchmarks.md).
PYTHON ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)

.PHONY: bench bench-quick bench-profile

bench:
	$(PYTHON) bench/run.py

bench-quick:
	$(PYTHON) bench/run.py --quick

bench-profile:
	$(PYTHON) bench/run.py --only checkout,heartbeat --profile --output bench/results-profile.json
