# `make test` and `make run` are the contract (README): each bootstraps .venv on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Installing again whenever pyproject.toml changes keeps a stale venv from hiding a missing dependency.
STAMP := $(VENV)/.installed

.PHONY: install browser run test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU build first, so the project's torch range is already satisfied and nothing larger is fetched.
	$(PY) -m pip install --quiet torch==2.13.0
	# The engine extra (torch, triton, ...) and the test tools: everything, for development.
	$(PY) -m pip install --quiet -e '.[engine,dev]'
	touch $(STAMP)

run: install
	$(VENV)/bin/ponder up

# The Flower browser test drives Debian's Chromium (Playwright's own browser download is never used):
# installed here when missing and apt-get can (as root); otherwise that one test skips, saying why.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1; } || \
	  echo "chromium could not be installed: the Flower browser test will skip"

test: install browser
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: install
	$(PY) benchmarks/engine_throughput.py

clean:
	rm -rf $(VENV) var .pytest_cache
