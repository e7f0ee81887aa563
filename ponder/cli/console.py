"""What every command shares: where output goes, and how an expected failure is reported (one line,
never a traceback)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import typer
from rich.console import Console

from ponder.engine.errors import PonderEngineError

console = Console(stderr=True)
out = Console()


class CliError(Exception):
    """A failure to report as one line."""


@contextmanager
def cli_errors() -> Iterator[None]:
    """Expected failures become `error: ...` on stderr and exit status 2."""
    from pydantic import ValidationError

    from ponder.cli.client import ApiClientError

    try:
        yield
    except (PonderEngineError, OSError, CliError, ValidationError, ApiClientError) as e:
        console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)  # one line, however narrow
        raise typer.Exit(2) from None


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"
