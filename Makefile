# `make demo` and `make test` set themselves up: a virtualenv in $(VENV) with graphopt installed.
# Where the venv has no torch yet, $(TORCH_SPEC) is installed first; the default is the CPU build
# that CPU machines have on disk (a plain `torch` would pull several GB of CUDA packages).
# On a GPU machine with torch installed: make demo VENV_FLAGS=--system-site-packages
VENV ?= .venv
VENV_FLAGS ?=
TORCH_SPEC ?= torch==2.13.0
PYTHON ?= python3
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: demo test test-fast setup clean

$(VENV)/.ready: pyproject.toml
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.ready

demo: setup
	$(PY) -m graphopt demo

test: setup
	$(PY) -m pytest -q -p no:cacheprovider --durations=15 $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) graphopt_dump
