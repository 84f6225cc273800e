# Two set-up commands from a fresh clone:  `make demo`  and  `make test`.
# TORCH is the torch requirement: leave it as `torch` to get your platform's default build,
# or pin it, e.g. `make test TORCH=torch==2.13.0` for a CPU-only machine (CI does this).
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch
BIN    := $(VENV)/bin

.PHONY: demo test install install-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install "$(TORCH)"
	$(BIN)/pip install -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install -e ".[dev,onnx]"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	$(BIN)/skcdf demo

test: install-dev
	$(BIN)/python -m pytest -n 2 -q

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
