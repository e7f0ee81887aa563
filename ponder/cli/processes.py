"""The service's processes: `ponder api`, the workers (started by ponder/workers/startup.py), Flower, and
`ponder up`, all of them at once. Imports stay inside the commands: `ponder api` never loads torch."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ponder.cli.console import CliError, cli_errors, console, out


def api(
    host: Annotated[str | None, typer.Option(help="Default: PONDER_API_HOST")] = None,
    port: Annotated[int | None, typer.Option(help="Default: PONDER_API_PORT")] = None,
    workers: Annotated[int, typer.Option(help="uvicorn worker processes")] = 1,
) -> None:
    """Serve the REST API (uvicorn)."""
    import uvicorn

    from ponder.service.settings import get_settings

    with cli_errors():
        settings = get_settings()
        try:
            settings.check_api()
        except ValueError as e:
            raise CliError(str(e)) from None
        if workers > 1:
            _share_metrics_between_processes()
        uvicorn.run(
            "ponder.api.app:create_app",
            factory=True,
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

    from ponder.service.settings import get_settings

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return
    directory = get_settings().data_dir / "prometheus-api"
    shutil.rmtree(directory, ignore_errors=True)  # counters start over with the processes
    directory.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory.resolve())


def worker(
    concurrency: Annotated[int | None, typer.Option(help="Threads (default: the engine's max_num_seqs)")] = None,
    hostname: Annotated[
        str, typer.Option(help="Celery node name; one per worker process on a host, e.g. inference-gpu1@%h")
    ] = "inference@%h",
) -> None:
    """Start an inference worker: one engine in this process, a thread per job in flight."""
    from ponder.workers.startup import run_inference_worker

    with cli_errors():
        run_inference_worker(concurrency, hostname)


def webhooks_worker(
    concurrency: Annotated[int | None, typer.Option(help="Threads (default: PONDER_WEBHOOK_CONCURRENCY)")] = None,
) -> None:
    """Deliver webhooks: consume the `webhooks` queue (no model, no engine in this process)."""
    from ponder.workers.startup import run_webhooks_worker

    with cli_errors():
        run_webhooks_worker(concurrency)


def batches_worker(
    concurrency: Annotated[int, typer.Option(min=1, help="Batches validated or finalized at once")] = 2,
) -> None:
    """Validate and finalize batches: consume the `batches` queue (no model, no engine in this process)."""
    from ponder.workers.startup import run_batches_worker

    with cli_errors():
        run_batches_worker(concurrency)


def beat(
    schedule: Annotated[
        Path | None, typer.Option(help="Where beat keeps its schedule (default: PONDER_BEAT_SCHEDULE)")
    ] = None,
) -> None:
    """Run maintenance: re-queue jobs whose worker died, expire jobs past their deadline, send due webhooks
    (batches' own work runs in `ponder batches-worker`)."""
    from ponder.service.settings import get_settings
    from ponder.workers.startup import run_beat

    with cli_errors():
        run_beat(schedule or get_settings().beat_schedule)


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

    from ponder.service.settings import get_settings

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
        from ponder.service.queue import celery_client  # the sending-only app: Flower never imports torch

        celery_client().start(argv)


def up() -> None:
    """The whole stack on embedded defaults: Redis, SQLite, migrations, the model, API, worker,
    webhooks worker, batches worker and beat as child processes. Ctrl-C stops them all."""
    from ponder.cli.devstack import run_stack

    with cli_errors():
        try:
            code = run_stack(console, out)
        except RuntimeError as e:  # a child that failed to start, a stack that never got ready
            raise CliError(str(e)) from e
        raise typer.Exit(code)
