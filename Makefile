# Two commands do all the set-up on a fresh machine:
#   make study [PROFILE=tiny|quick|paper] [CORES=n]   the study on the digital twin (Snakemake), then the book
#   make test                                         the test suite (what CI runs, <= 6 minutes)
# and one more for the slow tier:
#   make test-e2e                                     the full quick grid through Snakemake and the book
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROFILE ?=
CORES ?= all
SNAKEFLAGS ?=
export OMP_NUM_THREADS ?= 1
export MKL_NUM_THREADS ?= 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYDEVD_DISABLE_FILE_VALIDATION := 1

.PHONY: study test test-e2e lint clean install

install: $(VENV)/.installed

# Reinstall whenever the pinned dependencies change.
$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $@

# Every rule is one notebook run by papermill; an interrupted run resumes (--rerun-incomplete),
# a failing notebook stops only what depends on it (--keep-going).
study: install
	$(BIN)/snakemake --cores $(CORES) --rerun-incomplete --keep-going --printshellcmds \
		$(if $(PROFILE),--config profile=$(PROFILE),) $(SNAKEFLAGS)

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not e2e"

test-e2e: install
	$(BIN)/python -m pytest -q -p no:cacheprovider -m e2e

lint: install
	$(BIN)/ruff check helpers tests benchmarks notebooks

clean:
	rm -rf outputs book/_build book/generated .snakemake
