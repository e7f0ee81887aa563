"""compose.yaml: every service the design names is there, and every `ponder` command in it is one
the CLI accepts (checked by asking the CLI itself to parse the arguments)."""

from __future__ import annotations

from pathlib import Path

import yaml
from typer.main import get_command

from ponder.cli.main import app

COMPOSE = Path(__file__).resolve().parents[2] / "compose.yaml"


def load() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_services_and_their_shape():
    services = load()["services"]
    assert {"redis", "postgres", "migrate", "api", "worker", "webhooks", "batches", "beat", "flower"} <= set(services)
    redis_command = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_command and "--maxmemory-policy noeviction" in redis_command
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert "webhooks" in " ".join(services["webhooks"]["command"]) and "deploy" not in services["webhooks"]
    for name in ("migrate", "api", "worker", "webhooks", "batches", "beat", "flower"):
        env = services[name]["environment"]
        assert env["PONDER_DATABASE_URL"].startswith("postgresql://") and env["PONDER_REDIS_URL"].startswith("redis://")
        assert env["PONDER_ENVIRONMENT"] == "production"


def test_every_command_parses_with_the_cli():
    cli = get_command(app)
    for name, service in load()["services"].items():
        command = service.get("command")
        if not command or command[0] != "ponder":
            continue
        context = cli.make_context("ponder", list(command[1:]), resilient_parsing=False)
        sub = cli.get_command(context, command[1])
        assert sub is not None, f"{name}: unknown command {command[1]}"
        # descend into groups (`ponder db upgrade`) and parse the leaf's options
        args, leaf = list(command[2:]), sub
        while hasattr(leaf, "get_command") and args and leaf.get_command(context, args[0]) is not None:
            leaf = leaf.get_command(context, args.pop(0))
        leaf.make_context(command[1], args)  # raises on an unknown option or a bad value


def test_operators_view():
    """Flower behind basic auth with a required password and its history on a volume; each worker's
    metrics port reachable by Prometheus."""
    services = load()["services"]
    flower = services["flower"]
    assert flower["command"][:2] == ["ponder", "flower"] and "deploy" not in flower
    assert ":?" in flower["environment"]["PONDER_FLOWER_PASSWORD"]  # compose refuses to start without it
    db = flower["command"][flower["command"].index("--db") + 1]
    assert any(db.startswith(volume.split(":", 1)[1]) for volume in flower["volumes"])
    worker = services["worker"]
    port = worker["environment"]["PONDER_WORKER_METRICS_PORT"]
    assert port in worker["expose"] and worker["environment"]["PONDER_WORKER_METRICS_HOST"] == "0.0.0.0"


def test_every_pool_fits_in_postgres_max_connections():
    """docs/operations.md#capacity: the API processes' pools (x --workers), one per other process
    that opens the database, and 10 to spare fit PostgreSQL's max_connections; each API process's
    pool holds its request threads (Settings refuses the environment otherwise)."""
    from ponder.service.settings import Settings

    services = load()["services"]
    postgres = services["postgres"]["command"]
    max_connections = int(next(arg.split("=")[1] for arg in postgres if arg.startswith("max_connections=")))
    total = 10
    for name in ("api", "worker", "webhooks", "batches", "beat"):
        env = {k.removeprefix("PONDER_").lower(): v for k, v in services[name]["environment"].items()}
        settings = Settings(_env_file=None, **{k: v for k, v in env.items() if k in Settings.model_fields})
        command = services[name]["command"]
        processes = int(command[command.index("--workers") + 1]) if "--workers" in command else 1
        total += processes * (settings.db_pool_size + settings.db_max_overflow)
    assert total <= max_connections, (total, max_connections)
    assert services["api"]["command"][-2:] == ["--workers", "4"]
