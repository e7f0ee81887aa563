"""Fault injection for the end-to-end tests: this directory is on the PYTHONPATH of the test
stack's processes (tests/stack.py), so Python imports this file at startup. It does nothing unless
PONDER_TEST_POISON_SEED is set; then the engine's sampler raises, as a kernel fault would, whenever
a request with that seed is in the step's batch. The worker is otherwise untouched: the tests see
how a real worker treats a request that faults inside the engine."""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

POISON_SEED = os.environ.get("PONDER_TEST_POISON_SEED")


def _poison(module) -> None:
    real_sample = module.ModelRunner.sample

    def sample(self, logits, seqs, *args, **kwargs):
        if any(seq.params.seed == int(POISON_SEED) for seq in seqs):
            raise RuntimeError(f"injected fault: a request with seed {POISON_SEED} is in the batch")
        return real_sample(self, logits, seqs, *args, **kwargs)

    module.ModelRunner.sample = sample


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Patches engine.model_runner once it is imported; processes that never import it (the API,
    beat) never load torch because of this file."""

    def find_spec(self, name, path, target=None):
        if name != "ponder.engine.runtime.model_runner":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_poison(module) -> None:
            exec_module(module)
            _poison(module)

        spec.loader.exec_module = exec_then_poison  # type: ignore[method-assign]
        return spec


if POISON_SEED:
    sys.meta_path.insert(0, _PatchOnImport())
