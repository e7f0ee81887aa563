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
keys_app = typer.Typer(help="API keys: create, list, revoke.", no_args_is_help=True)
db_app = typer.Typer(help="The database schema.", no_args_is_help=True)
jobs_app = typer.Typer(help="Jobs through the REST API: list, show, cancel.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(keys_app, name="keys")
app.add_typer(db_app, name="db")
app.add_typer(jobs_app, name="jobs")
console = Console(stderr=True)
out = Console()


class CliError(Exception):
    """A failure to report as one line."""


@contextmanager
def cli_errors() -> Iterator[None]:
    """Expected failures become `error: ...` on stderr and exit status 2."""
    from pydantic import ValidationError

    from service.client import ApiClientError

    try:
        yield
    except (PonderEngineError, OSError, CliError, ValidationError, ApiClientError) as e:
        console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)  # one line, however narrow
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
    name: Annotated[str, typer.Argument(help="tiny-llama, tiny-qwen2, tiny-r1, tiny-dsv3-*, ...")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Directory to write (default: the cache)")
    ] = None,
    fp8: Annotated[
        bool, typer.Option("--fp8", help="The FP8 block-quantised variant (tiny-r1 -> tiny-r1-fp8)")
    ] = False,
) -> None:
    """Write a deterministic tiny random checkpoint as a Hugging Face directory."""
    from engine.model_store import cached_path
    from engine.tiny_models import SPECS, make_tiny

    if fp8 and not name.endswith("-fp8"):
        name = f"{name}-fp8"
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
    dtype: Annotated[str, typer.Option(help="Weight and KV-cache dtype for the byte figures")] = "bfloat16",
    context: Annotated[int, typer.Option(help="Context length for the total KV figure")] = 131072,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as one JSON object")] = False,
) -> None:
    """Architecture, parameters, weight and KV-cache memory, from the config alone (no weights are read)."""
    from engine.config import ModelConfig
    from engine.model_size import mha_kv_cache_bytes_per_token, model_size
    from engine.model_store import resolve_model

    dtype_bytes = {"float32": 4, "bfloat16": 2, "float16": 2, "float8": 1}
    with cli_errors():
        if dtype not in dtype_bytes:
            raise PonderEngineError(f"dtype must be one of {', '.join(dtype_bytes)}")
        if context < 1:
            raise PonderEngineError("context must be >= 1")
        path = resolve_model(model, fetch=False)
        config = ModelConfig.from_pretrained(path)
        try:
            size = model_size(config, dtype_bytes[dtype])
            per_token = config.kv_cache_bytes_per_token(dtype_bytes[dtype])
            mha_per_token = mha_kv_cache_bytes_per_token(config, dtype_bytes[dtype])
        except PonderEngineError as e:
            raise PonderEngineError(f"{path}: {e}") from None
        except (KeyError, TypeError) as e:
            raise PonderEngineError(f"{path}: missing or invalid field {e}") from None
    info = _model_info(config, size, dtype, per_token, mha_per_token, context)
    if as_json:
        import json

        out.print(json.dumps(info, indent=2), highlight=False, soft_wrap=True)
        return
    for key, value in _info_rows(info):
        out.print(f"{key:<28} {value}", highlight=False, soft_wrap=True)


def _model_info(config, size, dtype: str, per_token: int, mha_per_token: int, context: int) -> dict:
    from engine.model_size import is_moe_layer

    x = config.extra
    info = {
        "model_type": config.model_type,
        "attention": config.attention_kind,
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "parameters": size.parameters,
        "mtp_parameters": size.mtp_parameters,
        "total_parameters": size.total_parameters,
        "activated_parameters": size.activated_parameters,
        "dtype": dtype,
        "weight_bytes": size.weight_bytes,
        "mtp_weight_bytes": size.mtp_weight_bytes,
        "fp8_weight_bytes": size.weight_bytes_fp8,
        "fp8_mtp_weight_bytes": size.mtp_weight_bytes_fp8,
        "kv_cache_bytes_per_token": per_token,
        "context_tokens": context,
        "kv_cache_bytes": per_token * context,
        "max_position_embeddings": config.max_position_embeddings,
    }
    if config.model_type == "deepseek_v3":
        info |= {
            "dense_layers": sum(1 for i in range(config.num_hidden_layers) if not is_moe_layer(config, i)),
            "mtp_layers": int(x.get("num_nextn_predict_layers") or 0),
            "routed_experts": int(x["n_routed_experts"]),
            "experts_per_token": int(x["num_experts_per_tok"]),
            "shared_experts": int(x.get("n_shared_experts") or 0),
        }
    if config.attention_kind == "mla":
        info |= {"mha_kv_cache_bytes_per_token": mha_per_token, "mha_kv_cache_bytes": mha_per_token * context}
    return info


def _info_rows(info: dict) -> list[tuple[str, str]]:
    dtype, context = info["dtype"], info["context_tokens"]
    layers = f"{info['layers']}"
    if "routed_experts" in info:
        moe = info["layers"] - info["dense_layers"]
        layers += f" ({info['dense_layers']} dense, {moe} MoE)"
        if info["mtp_layers"]:
            layers += f" + {info['mtp_layers']} MTP"
    rows = [
        ("model_type", info["model_type"]),
        ("attention", info["attention"]),
        ("layers", layers),
        ("hidden size", f"{info['hidden_size']:,}"),
        ("heads / kv heads", f"{info['num_attention_heads']} / {info['num_key_value_heads']}"),
    ]
    if "routed_experts" in info:
        experts = f"{info['routed_experts']} routed ({info['experts_per_token']} per token)"
        rows.append(("experts", f"{experts} + {info['shared_experts']} shared"))
    rows.append(("parameters", _count(info["parameters"]) + (", main model" if info["mtp_parameters"] else "")))
    if info["mtp_parameters"]:
        rows.append(("parameters (MTP)", _count(info["mtp_parameters"])))
        rows.append(("parameters (total)", _count(info["total_parameters"])))
    if info["activated_parameters"] != info["parameters"]:
        rows.append(("activated per token", _count(info["activated_parameters"])))
    rows.append((f"weight bytes ({dtype})", _weights(info["weight_bytes"], info["mtp_weight_bytes"])))
    if info["fp8_weight_bytes"] is not None:
        rows.append(("weight bytes (fp8 ckpt)", _weights(info["fp8_weight_bytes"], info["fp8_mtp_weight_bytes"])))
    per_token, total = info["kv_cache_bytes_per_token"], info["kv_cache_bytes"]
    rows.append((f"KV bytes/token ({dtype})", f"{per_token:,}"))
    rows.append((f"KV bytes for {context:,} tokens", f"{total:,} ({_human_bytes(total)})"))
    if "mha_kv_cache_bytes_per_token" in info:
        mha_per_token, mha_total = info["mha_kv_cache_bytes_per_token"], info["mha_kv_cache_bytes"]
        rows.append(
            (
                "KV if MHA (no MLA)",
                f"{mha_per_token:,} bytes/token, {mha_total:,} ({_human_bytes(mha_total)}) "
                f"for {context:,} tokens: {mha_per_token / per_token:.1f}x",
            )
        )
    rows.append(("max context", f"{info['max_position_embeddings']:,}"))
    return rows


def _count(n: int) -> str:
    return f"{n:,} ({n / 1e9:.1f}B)" if n >= 1e9 else f"{n:,} ({n / 1e6:.1f}M)"


def _weights(main: int, mtp: int) -> str:
    text = f"{main:,} ({_human_bytes(main)})"
    return text + (f"; {main + mtp:,} ({_human_bytes(main + mtp)}) with MTP" if mtp else "")


# -- the service ------------------------------------------------------------------------------


@app.command("api")
def api(
    host: Annotated[str | None, typer.Option(help="Default: PONDER_API_HOST")] = None,
    port: Annotated[int | None, typer.Option(help="Default: PONDER_API_PORT")] = None,
    workers: Annotated[int, typer.Option(help="uvicorn worker processes")] = 1,
) -> None:
    """Serve the REST API (uvicorn)."""
    import uvicorn

    from service.settings import get_settings

    with cli_errors():
        settings = get_settings()
        if workers > 1:
            _share_metrics_between_processes()
        uvicorn.run(
            "service.app:app",
            host=host or settings.api_host,
            port=port or settings.api_port,
            workers=workers,
            log_level="info",
            proxy_headers=True,
        )


def _share_metrics_between_processes() -> None:
    """Several uvicorn processes: each scrape of /metrics reaches one of them, so they keep their
    request counters in files that every process reads (prometheus_client's multiprocess mode)."""
    import os
    import shutil

    from service.settings import VAR_DIR

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return
    directory = VAR_DIR / "prometheus-api"
    shutil.rmtree(directory, ignore_errors=True)  # counters start over with the processes
    directory.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory.resolve())


@app.command("worker")
def worker(
    concurrency: Annotated[int | None, typer.Option(help="Threads (default: the engine's max_num_seqs)")] = None,
    hostname: Annotated[
        str, typer.Option(help="Celery node name; one per worker process on a host, e.g. inference-gpu1@%h")
    ] = "inference@%h",
) -> None:
    """Start an inference worker: one engine in this process, a thread per job in flight."""
    from service.settings import get_settings

    with cli_errors():
        settings = get_settings()
        from workers.celery_app import app as celery_app
        from workers.metrics import EngineStats, start_metrics_server
        from workers.tasks import engine_host, worker_name

        engine_host()  # load the model before taking jobs
        start_metrics_server(engine_host, worker_name(), settings.worker_metrics_host, settings.worker_metrics_port)
        celery_app.steps["worker"].add(EngineStats)  # the engine's numbers in `inspect stats` (Flower)
        celery_app.worker_main(
            [
                "worker",
                "--queues=inference",
                "--pool=threads",
                f"--concurrency={concurrency or settings.max_num_seqs}",
                "--prefetch-multiplier=1",
                f"--hostname={hostname}",
                "--task-events",
                "--loglevel=INFO",
                "--without-gossip",
                "--without-mingle",
            ]
        )


@app.command("webhooks-worker")
def webhooks_worker(
    concurrency: Annotated[int | None, typer.Option(help="Threads (default: PONDER_WEBHOOK_CONCURRENCY)")] = None,
) -> None:
    """Deliver webhooks: consume the `webhooks` queue (no model, no engine in this process)."""
    from service.settings import get_settings

    with cli_errors():
        settings = get_settings()
        from workers.celery_app import app as celery_app

        celery_app.conf.include = ["workers.webhook_tasks"]  # only the webhook tasks: torch stays out
        celery_app.worker_main(
            [
                "worker",
                "--queues=webhooks",
                "--pool=threads",
                f"--concurrency={concurrency or settings.webhook_concurrency}",
                "--prefetch-multiplier=1",
                "--hostname=webhooks@%h",
                "--task-events",
                "--loglevel=INFO",
                "--without-gossip",
                "--without-mingle",
            ]
        )


@app.command("beat")
def beat(
    schedule: Annotated[Path, typer.Option(help="Where beat keeps its schedule")] = Path("var/celerybeat-schedule"),
) -> None:
    """Run maintenance: re-queue jobs whose worker died, expire jobs past their deadline, send due webhooks."""
    with cli_errors():
        schedule.parent.mkdir(parents=True, exist_ok=True)
        from workers.celery_app import app as celery_app

        celery_app.worker_main(
            [
                "worker",
                "--beat",
                f"--schedule={schedule}",
                "--queues=maintenance",
                "--pool=solo",
                "--hostname=maintenance@%h",
                "--task-events",
                "--loglevel=INFO",
                "--without-gossip",
                "--without-mingle",
            ]
        )


@app.command("flower")
def flower(
    host: Annotated[str | None, typer.Option(help="Default: PONDER_FLOWER_HOST")] = None,
    port: Annotated[int | None, typer.Option(help="Default: PONDER_FLOWER_PORT")] = None,
    url_prefix: Annotated[
        str | None, typer.Option(help="Serve under this path, behind a proxy (default: PONDER_FLOWER_URL_PREFIX)")
    ] = None,
    db: Annotated[Path | None, typer.Option(help="Where Flower saves its history (default: PONDER_FLOWER_DB)")] = None,
) -> None:
    """Start Flower, the Celery dashboard, on Ponder's broker: workers, queued/running/finished tasks.
    Basic auth from PONDER_FLOWER_USER / PONDER_FLOWER_PASSWORD (the default password only in development)."""
    import os

    from service.settings import get_settings

    with cli_errors():
        settings = get_settings()
        try:
            credentials = settings.flower_basic_auth()
        except ValueError as e:
            raise CliError(str(e)) from None
        os.environ["FLOWER_BASIC_AUTH"] = credentials  # Flower reads it from here; argv would show it in `ps`
        db = db or settings.flower_db
        db.parent.mkdir(parents=True, exist_ok=True)
        argv = [
            "flower",
            f"--address={host or settings.flower_host}",
            f"--port={port or settings.flower_port}",
            "--persistent=True",  # workers and task history survive a restart
            f"--db={db}",
            "--state_save_interval=60000",  # ms: also saved on a clean stop
            "--purge_offline_workers=86400",  # a worker gone for a day leaves the list
        ]
        prefix = (settings.flower_url_prefix if url_prefix is None else url_prefix).strip("/")
        if prefix:
            argv.append(f"--url_prefix={prefix}")
        from service.queue import celery_client  # the sending-only app: Flower never imports torch

        celery_client().start(argv)


@app.command("up")
def up() -> None:
    """The whole stack on embedded defaults: Redis, SQLite, migrations, the model, API, worker,
    webhooks worker and beat as child processes. Ctrl-C stops them all."""
    from service.devstack import run_stack

    with cli_errors():
        try:
            code = run_stack(console, out)
        except RuntimeError as e:  # a child that failed to start, a stack that never got ready
            raise CliError(str(e)) from e
        raise typer.Exit(code)


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument(help="Target revision")] = "head") -> None:
    """Apply the migrations (Alembic) to PONDER_DATABASE_URL."""
    from service.db import current_revision, upgrade

    with cli_errors():
        try:
            upgrade(revision=revision)
        except Exception as e:  # SQLAlchemy/Alembic errors: unreachable database, bad URL
            raise CliError(f"migration failed: {e}") from e
        out.print(f"database at revision {current_revision()}")


@keys_app.command("create")
def keys_create(name: Annotated[str, typer.Option("--name", help="Who or what the key is for")]) -> None:
    """Create an API key. The key is printed once, on the last line; only its hash is stored."""
    from sqlmodel import Session

    from service.db import get_engine
    from service.security import create_api_key

    with cli_errors():
        if not name.strip() or len(name) > 100:
            raise CliError("--name must be 1-100 characters")
        with Session(get_engine()) as session:
            row, key = create_api_key(session, name.strip())
        console.print(f"created key {row.id} ({row.name}); store it now, it is not shown again")
        console.print(
            f"webhook signing secret for its jobs' webhook_url: {row.webhook_secret}", highlight=False, soft_wrap=True
        )
        print(key)


@keys_app.command("list")
def keys_list() -> None:
    """List API keys (prefixes only)."""
    from sqlmodel import Session, select

    from service.db import get_engine
    from service.models import ApiKey

    with cli_errors():
        with Session(get_engine()) as session:
            rows = session.exec(select(ApiKey).order_by(ApiKey.created_at)).all()
        table = Table()
        for column in ("id", "name", "prefix", "created", "revoked"):
            table.add_column(column)
        for row in rows:
            revoked = row.revoked_at.isoformat(timespec="seconds") if row.revoked_at else ""
            table.add_row(
                str(row.id), row.name, row.prefix + "…", row.created_at.isoformat(timespec="seconds"), revoked
            )
        out.print(table)


@keys_app.command("revoke")
def keys_revoke(key: Annotated[str, typer.Argument(help="The key's id or prefix")]) -> None:
    """Revoke an API key: it stops working at once."""
    from sqlmodel import Session

    from service.db import get_engine
    from service.security import revoke_api_key

    with cli_errors():
        with Session(get_engine()) as session:
            row = revoke_api_key(session, key)
        if row is None:
            raise CliError(f"no key {key!r}")
        out.print(f"revoked {row.id} ({row.name})")


# -- a client of the REST API -----------------------------------------------------------------


@app.command("submit")
def submit(
    question: Annotated[str, typer.Argument(help="The user message")],
    wait: Annotated[bool, typer.Option("--wait", help="Stream the answer as it is written")] = False,
    max_tokens: Annotated[int | None, typer.Option(help="Completion tokens at most")] = None,
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = 0.6,
    seed: Annotated[int | None, typer.Option()] = None,
    math: Annotated[bool, typer.Option("--math", help="Append R1's maths directive")] = False,
) -> None:
    """Submit a job (and with --wait, stream the reasoning and the answer live)."""
    from service.client import ApiClient

    with cli_errors():
        client = ApiClient.from_env()
        body = {"messages": [{"role": "user", "content": question}], "temperature": temperature, "math": math}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        if seed is not None:
            body["seed"] = seed
        job = client.submit(body)
        if not wait:
            print(job["id"])
            return
        console.print(f"job {job['id']}", highlight=False)
        final = client.stream_live(job["id"], console)
        out.print(f"\n[dim]{final.get('status')} · {final.get('finish_reason')} · {final.get('usage')}[/dim]")


@jobs_app.command("list")
def jobs_list(
    status: Annotated[str | None, typer.Option(help="Only jobs in this status")] = None,
    limit: Annotated[int, typer.Option(help="How many (newest first)")] = 20,
) -> None:
    """List your jobs, newest first."""
    from service.client import ApiClient

    with cli_errors():
        page = ApiClient.from_env().list_jobs(status=status, limit=limit)
        table = Table()
        for column in ("id", "status", "created", "tokens", "answer"):
            table.add_column(column)
        for job in page["data"]:
            table.add_row(
                job["id"],
                job["status"],
                job["timings"]["created_at"],
                str(job["usage"]["total_tokens"]),
                job.get("answer") or "",
            )
        out.print(table)


@jobs_app.command("show")
def jobs_show(job_id: Annotated[str, typer.Argument()]) -> None:
    """Show one job as JSON."""
    import json

    from service.client import ApiClient

    with cli_errors():
        out.print_json(json.dumps(ApiClient.from_env().get_job(job_id)))


@jobs_app.command("cancel")
def jobs_cancel(job_id: Annotated[str, typer.Argument()]) -> None:
    """Cancel a queued or running job."""
    from service.client import ApiClient

    with cli_errors():
        job = ApiClient.from_env().cancel(job_id)
        out.print(f"{job['id']}: {job['status']}")


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
