# Two commands do all the set-up on a fresh machine:
#   make study [PROFILE=quick|paper]   the whole study on the digital twin, then the book
#   make test                          the test suite
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROFILE ?= paper
ONLY ?=
export OMP_NUM_THREADS ?= 1
export MKL_NUM_THREADS ?= 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYDEVD_DISABLE_FILE_VALIDATION := 1

.PHONY: study test lint book clean install

install: $(VENV)/.installed

# Reinstall whenever the pinned dependencies change.
$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $@

study: install
	$(BIN)/python -m helpers study --profile $(PROFILE) $(if $(ONLY),--only $(ONLY),)

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: install
	$(BIN)/ruff check helpers tests benchmarks notebooks

book: install
	$(BIN)/jupyter-book build book --toc book/generated/_toc.yml -W -n --keep-going

clean:
	rm -rf outputs book/_build book/generated
