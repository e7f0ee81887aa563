"""`ponder`: the command line. Long work shows progress; errors are one clear line, never a traceback."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

from engine.errors import PonderEngineError

app = typer.Typer(help="Ponder: async jobs for long LLM reasoning.", no_args_is_help=True)
models_app = typer.Typer(help="The local model cache: pull, make, list, inspect.", no_args_is_help=True)
app.add_typer(models_app, name="models")
console = Console(stderr=True)
out = Console()


@contextmanager
def cli_errors() -> Iterator[None]:
    """Expected failures become `error: ...` on stderr and exit status 2."""
    try:
        yield
    except (PonderEngineError, OSError) as e:
        console.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(2) from None


@models_app.command("pull")
def models_pull(name: Annotated[str, typer.Argument(help="A model alias, e.g. smollm2-135m")]) -> None:
    """Download a model into the cache (PONDER_MODEL_DIR)."""
    from engine.model_store import ALIASES, TinyModel, fetch_alias

    with cli_errors():
        if name not in ALIASES:
            raise PonderEngineError(f"unknown model alias {name!r}; known: {', '.join(ALIASES)}")
        if isinstance(ALIASES[name], TinyModel):
            path = fetch_alias(name)
        else:
            path = _pull_with_progress(name)
    out.print(str(path))


def _pull_with_progress(name: str) -> Path:
    from engine.model_store import fetch_alias

    columns = [TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn()]
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(f"{name}: downloading", total=None)

        def on_bytes(done: int, total: int) -> None:
            progress.update(task, description=f"{name}: extracting", completed=done, total=total)

        def on_log(message: str) -> None:
            progress.update(task, description=f"{name}: {message}")

        return fetch_alias(name, progress=on_bytes, log=on_log)


@models_app.command("make-tiny")
def models_make_tiny(
    name: Annotated[str, typer.Argument(help="tiny-llama or tiny-qwen2")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Directory to write (default: the cache)")
    ] = None,
) -> None:
    """Write a deterministic tiny random checkpoint as a Hugging Face directory."""
    from engine.model_store import cached_path
    from engine.tiny_models import SPECS, make_tiny

    with cli_errors():
        if name not in SPECS:
            raise PonderEngineError(f"unknown tiny model {name!r}; known: {', '.join(SPECS)}")
        path = make_tiny(name, output or cached_path(name))
    out.print(str(path))


@models_app.command("list")
def models_list() -> None:
    """Show what is in the model cache."""
    from engine.model_store import ALIASES, list_cached, model_dir

    cached = list_cached()
    table = Table(title=f"models in {model_dir()}")
    for column in ("name", "format", "size", "path"):
        table.add_column(column)
    for model in cached:
        table.add_row(model.name, model.kind, _human_bytes(model.size_bytes), str(model.path))
    out.print(table)
    missing = [alias for alias in ALIASES if alias not in {m.name for m in cached}]
    if missing:
        out.print(f"not cached (pulled on first use): {', '.join(missing)}")


@models_app.command("info")
def models_info(
    model: Annotated[str, typer.Argument(help="An alias, a model directory, a config.json or a GGUF file")],
    dtype: Annotated[str, typer.Option(help="Cache dtype for the KV figures")] = "bfloat16",
    context: Annotated[int, typer.Option(help="Context length for the total KV figure")] = 131072,
) -> None:
    """Architecture, parameters and KV-cache memory, from the config alone (no weights are read)."""
    from engine.config import ModelConfig
    from engine.model_store import resolve_model
    from engine.params import count_parameters

    dtype_bytes = {"float32": 4, "bfloat16": 2, "float16": 2, "float8": 1}
    with cli_errors():
        if dtype not in dtype_bytes:
            raise PonderEngineError(f"dtype must be one of {', '.join(dtype_bytes)}")
        path = resolve_model(model, fetch=False)
        config = ModelConfig.from_pretrained(path)
        params = count_parameters(config)
    per_token = config.kv_cache_bytes_per_token(dtype_bytes[dtype])
    rows = [
        ("model_type", config.model_type),
        ("attention", config.attention_kind),
        ("layers", config.num_hidden_layers),
        ("hidden size", config.hidden_size),
        ("heads / kv heads", f"{config.num_attention_heads} / {config.num_key_value_heads}"),
        ("parameters", f"{params:,}"),
        (f"weight bytes ({dtype})", f"{params * dtype_bytes[dtype]:,}"),
        (f"KV bytes/token ({dtype})", f"{per_token:,}"),
        (f"KV bytes for {context:,} tokens", f"{per_token * context:,} ({_human_bytes(per_token * context)})"),
        ("max context", f"{config.max_position_embeddings:,}"),
    ]
    for key, value in rows:
        out.print(f"{key:<28} {value}", highlight=False)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def main() -> None:
    app(prog_name="ponder")


if __name__ == "__main__":
    sys.exit(main())
