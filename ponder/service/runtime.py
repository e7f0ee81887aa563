"""Process-wide runtime tuning shared by the API and the workers."""

from __future__ import annotations

import gc


def freeze_startup_objects() -> None:
    """Take everything loaded so far (modules, the tokenizer, a worker's model and engine) out of
    the cyclic garbage collector's view. These live as long as the process; left in view, each
    full collection walks them all: in an inference worker that was ~180 ms every ~4 s at 100
    jobs/s, with every thread stopped, a SQLite write lock held meanwhile, and the API's inserts
    waiting on it (docs/benchmarks.md, Service load). Call once, when start-up is done."""
    gc.collect()
    gc.freeze()
