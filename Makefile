# The two commands a fresh machine needs: `make run` and `make test`. Each sets up .venv first
# (once; again when pyproject.toml changes).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.vizkit-installed

.PHONY: run test bench setup

run: $(STAMP)
	$(BIN)/vizkit $(ARGS)

# two workers, each file's tests on one (its module fixtures built once): most of a test's time is a
# `vizkit` process importing torch, timm and Lightning on one core (16 min on 2 cores in one worker, 10.5 in two)
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile $(PYTEST_ARGS)

bench: $(STAMP)
	test -f $(VENV)/.vizkit-bench || { $(BIN)/python -m pip install --quiet -e '.[dev,bench]' && touch $(VENV)/.vizkit-bench; }
	$(BIN)/python benchmarks/run.py $(ARGS)

setup: $(STAMP)

$(STAMP): pyproject.toml plugins/vizkit-rise/pyproject.toml plugins/vizkit-sparsity/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]' -e plugins/vizkit-rise -e plugins/vizkit-sparsity
	# torchattacks (the adversarial differential tests' peer) pins requests~=2.25.1, which conflicts with
	# huggingface_hub's own pins: it needs none of those at import, so it goes in without its dependencies
	$(BIN)/python -m pip install --quiet --no-deps torchattacks==3.5.1
	touch $(STAMP)
