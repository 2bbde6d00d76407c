# The README's commands. `make demo` sets everything up and runs the main job; `make test`
# runs the whole suite (unit, integration on the local cluster, format checks by tshark).
PY := .venv/bin/python

.PHONY: setup demo test unit lint bench-merge

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

bench-merge: setup
	$(PY) benchmarks/merge_bench.py
