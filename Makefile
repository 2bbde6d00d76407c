# The README's commands. `make demo` sets everything up and runs the main job; `make test`
# runs the whole suite (unit, integration on the local cluster, format checks by tshark).
PY := .venv/bin/python

.PHONY: setup demo test unit lint fuzz fuzz-core fuzz-diff wheels bench-merge

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

# The compiled core's fuzzer: libFuzzer through cargo-fuzz (rust/fuzz/run says what fails it).
# Needs Rust's nightly toolchain; installs cargo-fuzz from crates.io on first use.
FUZZ_CORE_SECONDS ?= 60
fuzz-core:
	PYTHON=$(PY) rust/fuzz/run $(FUZZ_CORE_SECONDS)

# Wheels as users get them, into dist/: Linux amd64 and arm64, the arm64 one cross-compiled
# (Rust's aarch64-unknown-linux-gnu target and gcc-aarch64-linux-gnu as its linker). abi3: one
# wheel per platform serves CPython 3.10 on. Each carries the upload bundles of both
# architectures (nodes need not be the client's). A wheel without the compiled core fails.
WHEEL_ENV := MULTISNIFF_REQUIRE_CORE=1
AARCH64 := CARGO_BUILD_TARGET=aarch64-unknown-linux-gnu \
	CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
wheels:
	rm -rf build dist/multisniff-*.whl
	$(WHEEL_ENV) $(PY) -m pip wheel --no-deps . -w dist
	rm -rf build
	$(WHEEL_ENV) $(AARCH64) $(PY) -m pip wheel --no-deps . -w dist \
		-C--build-option=--plat-name=linux_aarch64
	rm -rf build
	@for wheel in dist/multisniff-*.whl; do \
		echo "$$wheel:"; \
		unzip -p "$$wheel" multisniff/_core.abi3.so > dist/.core.so && file -b dist/.core.so; \
	done; rm -f dist/.core.so

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
