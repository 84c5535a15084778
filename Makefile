# The two commands of the README, and the benchmarks.  Each target makes
# .venv if it is missing and installs what it needs from pyproject.toml, so
# a fresh machine needs nothing installed by hand.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q

.PHONY: demo test bench clean venv

$(PY):
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "pymw-magic needs Python 3.10+"'
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

# One stamp per set of extras; re-installed when pyproject.toml changes.
$(VENV)/.core: pyproject.toml | $(PY)
	$(PIP) install -e .
	touch $@
$(VENV)/.test: pyproject.toml | $(PY)
	$(PIP) install -e '.[test]'
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@
$(VENV)/.bench: pyproject.toml | $(PY)
	$(PIP) install -e '.[bench]'
	touch $@

venv: $(VENV)/.core

demo: $(VENV)/.core
	$(PY) examples/monte_pi.py

test: $(VENV)/.test
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.bench
	$(PY) bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache test-output bench/out
