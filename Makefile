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

# The JupyterLab extension (labextension/, TypeScript) is built by the
# package's build hook (hatch-jupyter-builder: jlpm install, then a
# production build into pymw_magic/labextension) and installed with it into
# $(VENV)/share/jupyter/labextensions.  It needs Node.js >= 18 and the npm
# registry; only `make test` builds it (SKIP_JUPYTER_BUILDER elsewhere).
LABEXT_SOURCES := $(wildcard labextension/src/*.ts labextension/style/*) \
	labextension/package.json labextension/yarn.lock labextension/tsconfig.json
LABEXT_BUILD   := pymw_magic/labextension/package.json

# One stamp per set of extras; re-installed when pyproject.toml changes.
$(VENV)/.core: pyproject.toml | $(PY)
	SKIP_JUPYTER_BUILDER=1 $(PIP) install -e .
	touch $@
# A changed extension source drops the old build: the hook then makes a new one.
$(VENV)/.test: pyproject.toml $(LABEXT_SOURCES) | $(PY)
	@if [ -n "$(filter labextension/%,$?)" ]; then rm -rf pymw_magic/labextension; fi
	@command -v node >/dev/null 2>&1 || { echo "make test: Node.js (>= 18) is needed to build the JupyterLab extension" >&2; exit 1; }
	$(PIP) install -e '.[test,mpi,condor,boinc]'
	@[ -f $(LABEXT_BUILD) ] || { echo "make test: the JupyterLab extension did not build (see the pip output above)" >&2; exit 1; }
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@
$(VENV)/.bench: pyproject.toml | $(PY)
	SKIP_JUPYTER_BUILDER=1 $(PIP) install -e '.[bench,mpi]'
	touch $@

venv: $(VENV)/.core

demo: $(VENV)/.core
	$(PY) examples/monte_pi.py

# The browser test (tests/test_lab_browser.py) drives Debian's chromium;
# Playwright's own browser download (`playwright install`) is never used.
test: $(VENV)/.test
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  else echo "make test: chromium is missing and we are not root; the browser test will skip" >&2; fi; }
	$(PY) -m pytest $(PYTEST_ARGS)

# Peers side by side: executors (run.py), MPI (mpi.py), the simulator
# against SimPy and SimGrid (simulator.py; SimGrid is Debian's python3-simgrid),
# and the dashboard's cost (dashboard.py).
bench: $(VENV)/.bench
	@[ -e /usr/lib/python3/dist-packages/simgrid.py ] || ls /usr/lib/python3/dist-packages/simgrid* >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-simgrid; \
	  else echo "make bench: python3-simgrid missing and we are not root; SimGrid will be skipped" >&2; fi; }
	$(PY) bench/run.py $(BENCH_ARGS)
	$(PY) bench/mpi.py
	$(PY) bench/simulator.py
	$(PY) bench/dashboard.py

clean:
	rm -rf $(VENV) .pytest_cache test-output bench/out pymw_magic/labextension labextension/lib \
	  labextension/node_modules labextension/tsconfig.tsbuildinfo
