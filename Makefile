# One entry point for setting up, testing and demonstrating the project. Everything it needs is
# installed by these rules (caches live under ~/.cache so reruns are fast).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
UV := $(PYTHON) -m uv

.PHONY: test demo venv cluster-bins lint crd unit fmt

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
	$(PY) -m deepseek_operator.crd
	$(PY) -m deepseek_operator.peering
	$(PY) -m deepseek_operator.peering --output charts/deepseek-operator/crds/kopf-peering.yaml
	$(PY) -m deepseek_operator.docs

unit: $(VENV)/.installed
	$(PY) -m pytest tests/unit -q

test: $(VENV)/.installed cluster-bins lint
	$(PY) -m pytest tests -q

demo: $(VENV)/.installed cluster-bins
	$(PY) scripts/demo.py
