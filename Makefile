# `make demo` and `make test` set themselves up: a virtualenv in $(VENV) with graphopt installed.
#
# torch, where the venv has none yet, fits the machine:
#   - TORCH_SPEC set (make test TORCH_SPEC="torch==2.11.0"): exactly that, from pip's registries;
#   - a GPU (nvidia-smi lists one): torch==$(TORCH_VERSION) from pip's registries, the CUDA build,
#     which brings its matching triton;
#   - no GPU: the CPU build -- from a local wheel if pip's find-links has one, else from torch's
#     CPU index $(TORCH_CPU_INDEX) (PyPI's Linux wheel is the CUDA one, with GBs of CUDA
#     libraries). An index that does not answer fails within about a minute, never hangs.
# triton comes with the CUDA build; on CPU only `make test` installs it (the `test` extra), for
# the kernels' tests under the Triton interpreter.
# With torch already installed system-wide: make demo VENV_FLAGS=--system-site-packages
VENV ?= .venv
VENV_FLAGS ?=
TORCH_VERSION ?= 2.13.0
TORCH_SPEC ?=
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
# a registry that does not answer: 15 s per attempt, one retry
PIP_NET_FLAGS ?= --timeout 15 --retries 1
PYTHON ?= python3
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PYTEST_ARGS ?=
# pytest-xdist workers, a test module each at a time (its module-scoped gloo worker pools and
# Triton-interpreter subprocess stay on one worker): 2 halves CI's wall time on its 2 cores;
# TEST_WORKERS=0 runs in one process
TEST_WORKERS ?= 2
XDIST_ARGS := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

.PHONY: demo test test-fast setup setup-test clean

$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "torch already in $(VENV): $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	elif [ -n "$(TORCH_SPEC)" ]; then \
		$(PIP) install -q $(PIP_NET_FLAGS) "$(TORCH_SPEC)"; \
	elif nvidia-smi -L >/dev/null 2>&1; then \
		echo "GPU found: installing torch==$(TORCH_VERSION) (CUDA build)"; \
		$(PIP) install -q $(PIP_NET_FLAGS) "torch==$(TORCH_VERSION)"; \
	elif $(PIP) install -q --no-index --no-deps "torch==$(TORCH_VERSION)" 2>/dev/null; then \
		echo "no GPU: installed torch==$(TORCH_VERSION) from a local wheel; adding its dependencies"; \
		$(PIP) install -q $(PIP_NET_FLAGS) "torch==$(TORCH_VERSION)"; \
	else \
		echo "no GPU: installing the CPU build of torch==$(TORCH_VERSION) from $(TORCH_CPU_INDEX)"; \
		$(PIP) install -q $(PIP_NET_FLAGS) --index-url "$(TORCH_CPU_INDEX)" "torch==$(TORCH_VERSION)" \
		|| { echo "could not reach $(TORCH_CPU_INDEX). Install torch yourself and rerun with"; \
		     echo "VENV_FLAGS=--system-site-packages, point TORCH_CPU_INDEX at a mirror, or take"; \
		     echo "PyPI's build (CUDA libraries included): make TORCH_SPEC=torch==$(TORCH_VERSION)"; \
		     exit 1; }; \
	fi
	touch $@

$(VENV)/.ready: $(VENV)/.torch pyproject.toml
	$(PIP) install -q $(PIP_NET_FLAGS) -e .
	touch $@

$(VENV)/.ready-test: $(VENV)/.ready pyproject.toml
	$(PIP) install -q $(PIP_NET_FLAGS) -e ".[test]"
	touch $@

setup: $(VENV)/.ready

setup-test: $(VENV)/.ready-test

demo: setup
	$(PY) -m graphopt demo

test: setup-test
	$(PY) -m pytest -q -p no:cacheprovider --durations=15 $(XDIST_ARGS) $(PYTEST_ARGS)

test-fast: setup-test
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow" $(XDIST_ARGS) $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) graphopt_dump
