# The two entry points of README.md. Both set up .venv first (idempotent), so they work on a
# fresh machine with Python 3.11 and pip.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= test,torch
STUDY_OUT ?= runs/digits_aug
STUDY_FLAGS ?=

.PHONY: setup test study lint

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[$(EXTRAS)]'
	touch $@

test: setup
	$(PY) -m ruff check jaxrepro tests configs
	$(PY) -m pytest -q

study: setup
	$(VENV)/bin/jaxrepro study --config=configs/digits.py --vary=aug --seeds=0-3 \
	  --out=$(STUDY_OUT) $(STUDY_FLAGS)

lint: setup
	$(PY) -m ruff format --check jaxrepro tests configs
	$(PY) -m ruff check jaxrepro tests configs
