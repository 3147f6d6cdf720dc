# Set-up is automatic: the first `make train` or `make test` creates .venv and installs
# mmtrain into it (again whenever pyproject.toml changes). `make train` installs the core
# package only; the test targets add the dev extras (pytest, every optional integration).
VENV ?= .venv
PYTHON ?= python3
CORE_STAMP := $(VENV)/.installed-core
DEV_STAMP := $(VENV)/.installed-dev
ARGS ?=
# Test processes (pytest-xdist): the suite runs on both cores of a 2-core machine.
JOBS ?= 2

.PHONY: train test test-fast test-gpu lint format clean

$(CORE_STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q -e .
	touch $(CORE_STAMP)

$(DEV_STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q -e '.[dev]'
	touch $(DEV_STAMP) $(CORE_STAMP)

train: $(CORE_STAMP)  ## run `mmtrain train` (pass overrides with ARGS="optimizer.lr=3e-4 ...")
	$(VENV)/bin/mmtrain train $(ARGS)

test: $(DEV_STAMP)  ## the whole test suite, slow tests included (what CI runs)
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -q -n $(JOBS) --dist worksteal -m "not gpu" --durations=25 $(ARGS)

test-fast: $(DEV_STAMP)  ## the default suite without tests marked slow
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -q -n $(JOBS) --dist worksteal -m "not slow and not gpu" $(ARGS)

test-gpu: $(DEV_STAMP)  ## the CUDA tests (skipped without a GPU); benchmarks/gpu_check.sh runs them with the speed checks
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -q -m gpu $(ARGS)

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(DEV_STAMP)
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

clean:
	rm -rf outputs multirun .pytest_cache
