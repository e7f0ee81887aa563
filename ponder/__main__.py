"""`python -m ponder`: how `ponder up` and the tests start the commands (the same interpreter, no entry point)."""

from __future__ import annotations

from ponder.cli.main import main

# Guarded: a tensor-parallel worker's ranks are spawned processes, which import this module again.
if __name__ == "__main__":
    main()
