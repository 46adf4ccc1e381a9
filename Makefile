# Two entry points (see README): `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.llminstr-installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

# torch first, from the local CPU wheel when there is one: a bare `torch` requirement on a
# machine without torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0 || $(PY) -m pip install -q "torch>=2.4"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/llminstr demo --out out/demo

# Lint and types first (fast), then the suite. pytest exits 5 when it collects no test:
# that is not a failure of the suite.
test: $(STAMP)
	$(VENV)/bin/ruff check llminstr tests benchmarks readers tools
	$(VENV)/bin/ruff format --check llminstr tests benchmarks readers tools
	$(VENV)/bin/mypy
	$(PY) -m pytest -q -p no:cacheprovider; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

bench: $(STAMP)
	$(PY) benchmarks/bench_writer.py
	$(PY) benchmarks/bench_capture.py
	$(PY) benchmarks/bench_analysis.py

clean:
	rm -rf out .pytest_cache .mypy_cache .ruff_cache
