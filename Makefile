# One entry point for setting up, testing and demonstrating the project. Everything it needs is
# installed by these rules (caches live under ~/.cache so reruns are fast).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
UV := $(PYTHON) -m uv

.PHONY: test demo venv cluster-bins lint crd unit fmt device-deps

$(PY) venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -m uv --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet --user 'uv>=0.4'
	@test -x $(PY) || $(UV) venv --quiet --python $(PYTHON) $(VENV)
	$(UV) pip install --quiet --python $(PY) -e '.[dev]'
	@touch $@

cluster-bins:
	@bash tests/cluster/build.sh

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

fmt: $(VENV)/.installed
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# Regenerate everything derived from the API models (CRDs, the chart's copies, the API reference).
crd: $(VENV)/.installed
	$(PY) -m deepseek_operator.generators.crd
	$(PY) -m deepseek_operator.generators.peering
	$(PY) -m deepseek_operator.generators.peering --output charts/deepseek-operator/crds/kopf-peering.yaml
	$(PY) -m deepseek_operator.generators.docs

unit: $(VENV)/.installed
	$(PY) -m pytest tests/operator tests/repo -q

test: $(VENV)/.installed cluster-bins lint
	$(PY) -m pytest tests -q

demo: $(VENV)/.installed cluster-bins
	$(PY) scripts/demo.py

# The packages the worker, its benchmarks and tests need beyond what the lent GPU machine's python3
# has (torch, transformers, safetensors, numpy), one directory per Python version, since that
# machine cannot install: carry .device-deps (or only the pyXY of its python3) and put
# .device-deps/pyXY on PYTHONPATH. xgrammar comes without its dependencies (torch, transformers,
# triton: the machine has them) but with the one it adds, apache-tvm-ffi.
DEVICE_PYTHONS := 3.10 3.11 3.12 3.13
DEVICE_PACKAGES := pydantic prometheus-client jinja2 pytest pytest-timeout
DEVICE_NO_DEPS := xgrammar==0.2.8 apache-tvm-ffi
device-deps:
	@$(PYTHON) -m uv --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet --user 'uv>=0.4'
	for v in $(DEVICE_PYTHONS); do \
	  $(UV) pip install --quiet --target .device-deps/py$${v/./} --python-version $$v \
	    --python-platform x86_64-manylinux_2_28 $(DEVICE_PACKAGES) || exit 1; \
	  $(UV) pip install --quiet --no-deps --target .device-deps/py$${v/./} --python-version $$v \
	    --python-platform x86_64-manylinux_2_28 $(DEVICE_NO_DEPS) || exit 1; \
	done
