# Local development of the merge service. On a fresh Linux machine:  make demo   and   make test
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STACK_ROOT ?= .stack
TORCH_VERSION ?= 2.13.0
# On a CPU machine torch is installed first, so that pip never pulls the multi-GB CUDA build: pip's own
# configuration (e.g. find-links to a local wheel) decides where it comes from; without a local wheel use
#   make install TORCH_INDEX_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_INDEX_ARGS ?=
INSTALLED := $(VENV)/.mudsc-installed
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo yes)

.PHONY: help install lint format up down status test unit demo bench clean distclean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 12

install: $(INSTALLED)  ## virtualenv in .venv with the package and its dev extra (idempotent)

$(INSTALLED): pyproject.toml client/pyproject.toml
	@bash scripts/ensure_deps.sh python
	@test -x $(PY) || { $(PYTHON) -m venv $(VENV) && $(PIP) install -q --upgrade pip; }
	@if [ -z "$(HAS_GPU)" ] && ! $(PY) -c 'import torch, sys; sys.exit(0 if torch.__version__.startswith("$(TORCH_VERSION)") else 1)' 2>/dev/null; then \
	  echo "CPU machine: installing torch==$(TORCH_VERSION) (CPU build) first"; \
	  $(PIP) install torch==$(TORCH_VERSION) $(TORCH_INDEX_ARGS); \
	fi
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q -e ./client
	@touch $@

lint: install  ## ruff (lint + format check), mypy (strict on the core), import rules (lint-imports)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy mudsc_core
	$(VENV)/bin/lint-imports

format: install  ## apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

up: install  ## start Redis, S3 (SeaweedFS), a Celery worker and the API under .stack/
	$(PY) -m scripts.localstack --root $(STACK_ROOT) up

down:  ## stop what 'make up' started
	@if [ -x $(PY) ]; then $(PY) -m scripts.localstack --root $(STACK_ROOT) down; fi

status:  ## show the local stack's processes
	$(PY) -m scripts.localstack --root $(STACK_ROOT) status

test: install  ## the whole suite: unit, integration (starts its own stack), end-to-end
	$(PY) -m pytest -q

unit: install  ## unit tests only (no services)
	$(PY) -m pytest -q tests/unit

demo: up  ## train two digit classifiers (and two Hugging Face BERTs), merge them through the API, compare accuracies
	$(PY) scripts/demo.py --env-file $(STACK_ROOT)/env
	$(PY) scripts/demo_transformers.py --env-file $(STACK_ROOT)/env
	@echo "The stack is still up ($(STACK_ROOT)/env has its URL and keys). Stop it with: make down"

bench: install  ## benchmarks in bench/ (ratios against a baseline measured in the same run)
	@if [ -f bench/__main__.py ]; then $(PY) -m bench; \
	else found=0; for f in bench/bench_*.py; do [ -e "$$f" ] || continue; found=1; echo "== $$f"; $(PY) "$$f"; done; \
	  [ $$found = 1 ] || echo "no benchmarks in bench/ yet"; fi

clean: down  ## stop the stack, remove its state and caches (keeps .venv)
	rm -rf $(STACK_ROOT) .demo .bench .pytest_cache .hypothesis build dist *.egg-info
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean  ## clean, and remove the virtualenv
	rm -rf $(VENV)
