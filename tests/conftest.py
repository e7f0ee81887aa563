"""Shared fixtures: engines and transformers references are expensive, so each (model, config)
is built once per session. Models live in the user's model cache (PONDER_MODEL_DIR, default
~/.cache/ponder/models): a clean machine pulls or makes them on first use.

The session runs in a directory of its own: before anything imports Ponder's settings, every
PONDER_ variable of the caller's environment but the model cache and the tests' own knobs
(PONDER_TEST_*) is dropped, no .env file is read (PONDER_ENV_FILE), and PONDER_DATA_DIR, from which
every path setting derives (database, files, Flower's and beat's files, the development key), is
a temporary directory. A `make run` in the same checkout (its var/) is never read or written."""

from __future__ import annotations

import gc
import os
import shutil
import tempfile

import pytest
import torch

KEPT_VARIABLES = ("PONDER_MODEL_DIR",)
for _name in [n for n in os.environ if n.startswith("PONDER_") and not n.startswith("PONDER_TEST_")]:
    if _name not in KEPT_VARIABLES:
        del os.environ[_name]
os.environ["PONDER_ENV_FILE"] = os.devnull
SESSION_DATA_DIR = tempfile.mkdtemp(prefix="ponder-tests-")
os.environ["PONDER_DATA_DIR"] = SESSION_DATA_DIR

# Under pytest-xdist (`make test`: two processes) each process owns four Redis databases of its own
# (a stack uses PONDER_TEST_REDIS_DB - 1 .. + 2): 13 for the first, 9 for the second. Database 0
# stays a `make run`'s.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # gw0, gw1, ...
if XDIST_WORKER and "PONDER_TEST_REDIS_DB" not in os.environ:
    _index = int(XDIST_WORKER.removeprefix("gw"))
    if _index > 2:
        raise RuntimeError("at most three test processes: each needs four of Redis' sixteen databases")
    os.environ["PONDER_TEST_REDIS_DB"] = str(13 - 4 * _index)

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. The flag is read
# when a kernel is decorated, so it must be set before any kernels.triton_kernels module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.references import reference_dir  # noqa: E402  (after the environment above)
from tests.stack import TEST_THREADS  # noqa: E402

if TEST_THREADS:
    torch.set_num_threads(TEST_THREADS)

_ENGINES: dict = {}
TEST_KV_CACHE_BYTES = 128 << 20
_HF: dict = {}
# The session keeps the most recently used engines and references only: keeping every one it
# built (weights, KV caches, rank processes) grew one pytest process past 19 GB and the OOM killer
# ended the run. An engine dropped here is freed once no test holds it (its ranks stop with it:
# ModelRunner's finalizer).
MAX_CACHED_ENGINES = 6
MAX_CACHED_HF_MODELS = 3


def _remember(cache: dict, key, value, limit: int):
    cache.pop(key, None)
    cache[key] = value  # newest last
    while len(cache) > limit:
        cache.pop(next(iter(cache)))
        gc.collect()
    return value


@pytest.fixture(scope="session")
def make_llm():
    """make_llm(model, **engine_config) -> a cached LLM built with those settings."""
    from ponder.engine.runtime import LLM

    def make(model: str, **config):
        key = (model, tuple(sorted(config.items())))
        if key in _ENGINES:
            return _remember(_ENGINES, key, _ENGINES[key], MAX_CACHED_ENGINES)
        # A small KV budget each (the default, a quarter of free memory up to 1 GiB, taken by
        # several engines, exhausts the machine).
        config.setdefault("kv_cache_memory", TEST_KV_CACHE_BYTES)
        config.setdefault("num_threads", TEST_THREADS)
        return _remember(_ENGINES, key, LLM(model, **config), MAX_CACHED_ENGINES)

    return make


@pytest.fixture(scope="session")
def hf_model():
    """hf_model(alias) -> the transformers model on the same weights, fp32, eval mode."""
    from transformers import AutoModelForCausalLM

    def load(alias: str):
        if alias not in _HF:
            model = AutoModelForCausalLM.from_pretrained(reference_dir(alias), dtype=torch.float32)
            model.generation_config.eos_token_id = None  # compare fixed-length continuations
            return _remember(_HF, alias, model.eval(), MAX_CACHED_HF_MODELS)
        return _remember(_HF, alias, _HF[alias], MAX_CACHED_HF_MODELS)

    return load


def pytest_unconfigure(config):
    shutil.rmtree(SESSION_DATA_DIR, ignore_errors=True)


# End-to-end modules that start stacks of their own and never use the session's (tests/e2e/conftest.py).
OWN_STACK_MODULES = {
    f"tests/e2e/{name}.py"
    for name in (
        "test_capacity",
        "test_database_outage",
        "test_faults",
        "test_harnesses",
        "test_speculative_worker",
        "test_tensor_parallel_worker",
        "test_walkthrough",
    )
}
SESSION_STACK_FIXTURES = {"stack", "sdk", "database_url"}


def pytest_xdist_make_scheduler(config, log):
    """Under pytest-xdist (`make test`), a module is the unit a process takes, whole (its engines and
    references are built once), and the end-to-end modules on the session's two stacks are one
    unit: they run in one process, in order (tests/e2e/conftest.py). (xdist's own `--dist
    loadgroup` does not group under pytest 9.)"""
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "tests/e2e" if path.startswith("tests/e2e/") and path not in OWN_STACK_MODULES else path

    return ModuleScheduling(config, log)


def pytest_collection_modifyitems(items):
    """A module said to start its own stacks must not use the session's: in another process than
    the session stack's unit, it would start a second pair of them."""
    for item in items:
        if str(item.path.relative_to(item.config.rootpath)) in OWN_STACK_MODULES:
            used = SESSION_STACK_FIXTURES & set(getattr(item, "fixturenames", ()))
            if used:
                raise pytest.UsageError(f"{item.nodeid} uses {sorted(used)}: take it out of OWN_STACK_MODULES")
