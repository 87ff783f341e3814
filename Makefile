# The two entry points of README.md. Both set up .venv first (idempotent), so they work on a
# fresh machine with Python 3.11 and pip.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= test,torch,analysis
STUDY_OUT ?= runs/digits_aug
STUDY_FLAGS ?=
PAPER_OUT ?= results/paper
PAPER_FLAGS ?=
# Transparent huge pages for malloc (glibc; ignored elsewhere): XLA:CPU's per-step buffers
# then cost ~1 k page faults a step instead of ~50-300 k (jaxrepro/plumbing/procenv.py). The CLI
# sets it for itself; exported here so that pytest's in-process runs have it too.
GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1
export GLIBC_TUNABLES

.PHONY: setup test test-slow study paper lint

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[$(EXTRAS)]'
	touch $@

# Two test processes: compiles (one thread each) overlap the other's steps on 2 cores; a
# file's tests stay in one process, so its module fixtures are built once. The benchmarks'
# smoke runs (marked slow: minutes of measuring code, no product behaviour) are
# `make test-slow`.
test: setup
	$(PY) -m ruff check jaxrepro tests configs
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow"

test-slow: setup
	$(PY) -m pytest -q -m slow

# The main job: two augmentation recipes of fine-tuning (crop padding 4; 3 as a branch at the
# fine-tune start) x 3 augmentation seeds,
# the exact replay and the diagnosis of the most severe drop-off (configs/studies/paper.py).
study: setup
	$(VENV)/bin/jaxrepro study --design=configs/studies/paper.py:quick \
	  --out=$(STUDY_OUT) $(STUDY_FLAGS)

# The paper's whole design (every arm, 8 seeds each). Resumable: run it again after a stop
# (Ctrl-C, SIGTERM, a lost node) and it goes on where it was; finished runs are skipped.
paper: setup
	$(VENV)/bin/jaxrepro study --design=configs/studies/paper.py \
	  --out=$(PAPER_OUT) $(PAPER_FLAGS)

lint: setup
	$(PY) -m ruff format --check jaxrepro tests configs
	$(PY) -m ruff check jaxrepro tests configs
