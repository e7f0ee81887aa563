"""How each worker process starts: the inference worker, the webhooks worker, the batches worker and beat. The `ponder`
commands parse their options and call these.

Imports stay inside the functions: which task modules a process loads is part of what it is (the
webhooks worker never loads torch or the engine)."""

from __future__ import annotations

from pathlib import Path

# What `ponder beat` imports: the tasks it sends and runs (sweep-webhooks is a webhook task). Both
# modules are torch-free, so beat runs in the slim image (docker/api.Dockerfile).
BEAT_TASK_MODULES = ["ponder.workers.maintenance_tasks", "ponder.workers.webhook_tasks"]
BATCHES_TASK_MODULES = ["ponder.workers.batch_tasks"]  # `ponder batches-worker`: torch-free too


def worker_argv(queue: str, hostname: str, threads: int | None = None, beat_schedule: Path | None = None) -> list[str]:
    """`celery worker` arguments for one of Ponder's queues. With `threads`: a thread pool that
    reserves one job per thread (prefetch 1), so a queued job stays in Redis for whichever worker is
    free; without: the solo pool. Task events feed Flower; gossip and mingle, worker-to-worker chatter,
    are off."""
    argv = ["worker"]
    if beat_schedule is not None:
        argv += ["--beat", f"--schedule={beat_schedule}"]
    argv += [f"--queues={queue}"]
    if threads is None:
        argv += ["--pool=solo"]
    else:
        argv += ["--pool=threads", f"--concurrency={threads}", "--prefetch-multiplier=1"]
    return argv + [f"--hostname={hostname}", "--task-events", "--loglevel=INFO", "--without-gossip", "--without-mingle"]


def run_inference_worker(concurrency: int | None, hostname: str) -> None:
    """One engine in this process, loaded before the first job is taken; a thread per job in flight
    (default: the engine's max_num_seqs). On CUDA, first a check that torch sees the GPUs asked for
    and that they can hold the model (ponder/workers/device_check.py): what is missing is one ConfigError."""
    from ponder.service.runtime import freeze_startup_objects
    from ponder.service.settings import get_settings
    from ponder.workers.device_check import check_worker_devices

    settings = get_settings()
    check_worker_devices(settings.model, settings.engine)  # before the engine's minutes of loading
    from ponder.workers.celery_app import app as celery_app
    from ponder.workers.exporter import EngineStats, start_metrics_server
    from ponder.workers.tasks import engine_host, worker_name

    engine_host()  # load the model before taking jobs
    start_metrics_server(engine_host, worker_name(), settings.worker_metrics_host, settings.worker_metrics_port)
    celery_app.steps["worker"].add(EngineStats)  # the engine's numbers in `inspect stats` (Flower)
    freeze_startup_objects()  # the model and engine, out of every full garbage collection's walk
    celery_app.worker_main(worker_argv("inference", hostname, threads=concurrency or settings.engine.max_num_seqs))


def run_webhooks_worker(concurrency: int | None) -> None:
    """Consume the `webhooks` queue: no model, no engine in this process."""
    from ponder.service.settings import get_settings

    settings = get_settings()
    from ponder.workers.celery_app import app as celery_app

    celery_app.conf.include = ["ponder.workers.webhook_tasks"]  # only the webhook tasks: torch stays out
    threads = concurrency or settings.webhook_concurrency
    celery_app.worker_main(worker_argv("webhooks", "webhooks@%h", threads=threads))


def run_batches_worker(concurrency: int) -> None:
    """Consume the `batches` queue (validations, finalizations): no model, no engine in this process;
    `concurrency` batches at a time."""
    from ponder.workers.celery_app import app as celery_app

    celery_app.conf.include = BATCHES_TASK_MODULES  # torch stays out
    celery_app.worker_main(worker_argv("batches", "batches@%h", threads=concurrency))


def run_beat(schedule: Path) -> None:
    """Beat and the maintenance queue in one solo process: the schedule sends the periodic tasks,
    the same process runs them."""
    schedule.parent.mkdir(parents=True, exist_ok=True)
    from ponder.workers.celery_app import app as celery_app

    celery_app.conf.include = BEAT_TASK_MODULES  # the maintenance and webhook tasks only: torch stays out
    celery_app.worker_main(worker_argv("maintenance", "maintenance@%h", beat_schedule=schedule))
