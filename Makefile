# The README's commands. `make demo` sets everything up and runs the main job; `make test`
# runs the whole suite (unit, integration on the local cluster, format checks by tshark).
PY := .venv/bin/python

.PHONY: setup demo test unit lint fuzz bench-merge

setup:
	.ci/setup

demo: setup
	./demo/run

test: setup
	$(PY) -m pytest

unit: setup
	$(PY) -m pytest -m 'not cluster'

lint:
	.venv/bin/ruff check multisniff tests benchmarks
	.venv/bin/mypy
	.venv/bin/lint-imports

# Damaged captures, many of them (tests/integration/test_damage_fuzz.py); the suite runs 40.
# FUZZ_CASES=N and FUZZ_SEED=S change the number and the seed; failing files are kept in
# FUZZ_FAILURES. Needs root, tcpdump and the Wireshark tools.
FUZZ_CASES ?= 5000
FUZZ_SEED ?= 9
FUZZ_FAILURES ?= /tmp/multisniff-fuzz-failures
fuzz:
	MULTISNIFF_FUZZ_CASES=$(FUZZ_CASES) MULTISNIFF_FUZZ_SEED=$(FUZZ_SEED) \
		MULTISNIFF_FUZZ_FAILURES=$(FUZZ_FAILURES) \
		$(PY) -m pytest tests/integration/test_damage_fuzz.py --timeout=0 -q --show-capture=no

bench-merge: setup
	$(PY) benchmarks/merge_bench.py
