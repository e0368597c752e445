# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXP ?= exp/demo

.PHONY: setup test demo clean

setup: $(STAMP)

# Re-installs only when pyproject.toml changes (idempotent).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

test: setup
	$(PY) -m pytest -q tests

# The main job on the embedded mini corpus: corpus -> preparation (-> training, evaluation, analysis).
demo: setup
	$(PY) -m data.mini $(EXP)/corpus
	$(PY) -m data.prepare --root $(EXP)/corpus --alignments $(EXP)/corpus/alignments --out $(EXP)/data

clean:
	rm -rf $(EXP)
