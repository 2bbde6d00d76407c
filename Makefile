# The README's commands. `make demo` sets everything up and runs the main job; `make test`
# runs the whole suite (unit, integration on the local cluster, format checks by tshark).
PY := .venv/bin/python

.PHONY: setup demo test unit lint fuzz fuzz-diff bench-merge

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

# The compiled core against the pure-Python one on random and damaged inputs
# (tests/unit/test_core_differential.py); the suite runs 150 reader cases and 50 of each merger
# mode. DIFF_CASES=N and DIFF_SEED=S change the number and the seed; differing cases are kept in
# DIFF_FAILURES with their inputs and chunking.
DIFF_CASES ?= 20000
DIFF_SEED ?= 12
DIFF_FAILURES ?= /tmp/multisniff-diff-failures
fuzz-diff:
	MULTISNIFF_CORE=compiled MULTISNIFF_DIFF_CASES=$(DIFF_CASES) MULTISNIFF_DIFF_SEED=$(DIFF_SEED) \
		MULTISNIFF_DIFF_FAILURES=$(DIFF_FAILURES) \
		$(PY) -m pytest tests/unit/test_core_differential.py --timeout=0 -q -rx --show-capture=no

bench-merge: setup
	$(PY) benchmarks/merge_bench.py
