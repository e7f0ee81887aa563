"""`python -m cli`: how `ponder up` and the tests start the commands (the same interpreter, no entry point)."""

from __future__ import annotations

from cli.main import main

main()
