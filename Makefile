# Quick start: `make demo` and `make test` on a fresh machine with Python >= 3.10 and make.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTEST_ARGS ?= -n 2

.PHONY: demo test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Stamp files: reinstall only when the package metadata changes.
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e ".[test]"
	touch $(VENV)/.installed $@

demo: $(VENV)/.installed
	$(VENV)/bin/tomoloc demo --out demo_out

test: $(VENV)/.installed-test
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf demo_out .pytest_cache .hypothesis
