# `make test` and `make run` are the contract (README): each bootstraps .venv on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch, installed before anything else (docker/worker.Dockerfile: the CUDA build of the same).
TORCH := torch==2.13.0
# The versions the suite last passed with (pip-tools; `make lock` refreshes it). A constraint, not a
# requirement list: pyproject.toml says what is needed, this file which version of it.
LOCK := requirements-lock.txt
# Installing again whenever pyproject.toml or the lock changes keeps a stale venv from hiding a missing dependency.
STAMP := $(VENV)/.installed
# The canary's throwaway venv: the newest releases pyproject.toml allows (`make test-latest`).
LATEST_VENV := .venv-latest
# Its tests: the layout and packaging, the engine against transformers, llguidance's constraints and
# tool calls (checked by jsonschema), the request shapes pydantic validates, and the evaluation
# harnesses (lm-eval, inspect-ai and what they pull in) against a stack.
LATEST_TESTS := tests/test_layout.py tests/test_packaging.py tests/engine/test_against_transformers.py \
	tests/engine/test_constrained_decoding.py tests/engine/test_tool_calls.py tests/engine/test_structured_validity.py \
	tests/service/test_response_format.py tests/service/test_function_tools.py tests/e2e/test_harnesses.py

.PHONY: install browser kernels run test lint lock test-latest bench clean

# A venv $(1) with pip, torch, then the project's engine extra (torch, triton, ...) and the test
# tools: everything, for development; $(2) are pip's options for which versions. The CPU build of
# torch first, so the project's torch range is already satisfied and nothing larger is fetched.
define install_venv
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install --quiet --upgrade $(2) pip
	$(1)/bin/python -m pip install --quiet $(TORCH)
	$(1)/bin/python -m pip install --quiet $(2) -e '.[engine,dev]'
endef

install: $(STAMP)

# At the locked versions.
$(STAMP): pyproject.toml $(LOCK)
	$(call install_venv,$(VENV),-c $(LOCK))
	touch $(STAMP)

run: install kernels
	$(VENV)/bin/ponder up

# The C++ CPU kernels, built before anything runs (ponder/kernels/cpu/__main__.py); a no-op once built.
kernels: install
	$(PY) -m ponder.kernels.cpu

# The Flower browser test drives Debian's Chromium (Playwright's own browser download is never used):
# installed here when missing and apt-get can (as root); otherwise that one test skips, saying why.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1; } || \
	  echo "chromium could not be installed: the Flower browser test will skip"

# Two processes (pytest-xdist): the end-to-end tests in one, module by module the rest in either
# (tests/conftest.py: pytest_xdist_make_scheduler); TEST_WORKERS=0 runs everything in one. pytest's temporary directories go in a
# folder of this run's own (its shared numbered folders are pruned by whichever run ends last, even
# while another run on the machine still uses its own), kept when a test fails to read the logs.
TEST_WORKERS ?= 2
test: install browser kernels
	@basetemp=$$(mktemp -d "$${TMPDIR:-/tmp}/ponder-tests.XXXXXX") && \
	  { $(PY) -m pytest -n $(TEST_WORKERS) --basetemp="$$basetemp" $(PYTEST_ARGS) && rm -rf "$$basetemp" || \
	    { status=$$?; echo "the tests' files are kept in $$basetemp"; exit $$status; }; }

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# The newest releases pyproject.toml allows for the engine and dev extras (torch stays $(TORCH):
# the Makefile's pin, not a range), written to $(LOCK); then run `make test` before committing it.
# `make lock UPGRADE=` keeps every pin the lock has that pyproject.toml still allows and only adds
# what is new (a dependency added to pyproject.toml, and what it pulls in; an old pin the new one
# conflicts with is re-resolved, and shows in the diff). pip-compile needs only the venv's pip-tools:
# not an install at the old pins, which such a conflict would fail.
UPGRADE ?= --upgrade
$(VENV)/bin/pip-compile:
	$(MAKE) install
lock: | $(VENV)/bin/pip-compile
	echo '$(TORCH)' > $(VENV)/torch-constraint.txt
	CUSTOM_COMPILE_COMMAND="make lock" $(VENV)/bin/pip-compile --quiet $(UPGRADE) --extra engine --extra dev \
	  --strip-extras --unsafe-package torch --no-emit-index-url --no-emit-find-links \
	  --constraint $(VENV)/torch-constraint.txt --output-file $(LOCK) pyproject.toml

# The canary (not part of `make test`): a throwaway venv with the newest releases pyproject.toml
# allows, no lock, then the import and engine-vs-transformers tests. It finds the next upstream
# release that breaks Ponder before a user does; what it installed beyond the lock is printed.
test-latest:
	rm -rf $(LATEST_VENV)
	$(call install_venv,$(LATEST_VENV),--upgrade --upgrade-strategy eager)
	$(LATEST_VENV)/bin/python -m tests.lock $(LOCK)
	$(LATEST_VENV)/bin/python -m pytest -p no:cacheprovider $(LATEST_TESTS) $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/engine_throughput.py

clean:
	rm -rf $(VENV) $(LATEST_VENV) var .pytest_cache
