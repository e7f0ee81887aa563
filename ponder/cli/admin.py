"""`ponder db` and `ponder keys`: the schema and the API keys, straight on PONDER_DATABASE_URL."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from ponder.cli.console import CliError, cli_errors, console, out
from ponder.service.settings import get_settings

keys_app = typer.Typer(help="API keys: create, list, update limits, revoke.", no_args_is_help=True)
db_app = typer.Typer(help="The database schema.", no_args_is_help=True)
secrets_app = typer.Typer(help="Webhook signing secrets at rest (PONDER_SECRET_KEY).", no_args_is_help=True)


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument(help="Target revision")] = "head") -> None:
    """Apply the migrations (Alembic) to PONDER_DATABASE_URL."""
    from ponder.service.db import current_revision, upgrade

    url = get_settings().database_url
    with cli_errors():
        try:
            upgrade(url, revision)
        except Exception as e:  # SQLAlchemy/Alembic errors: unreachable database, bad URL
            raise CliError(f"migration failed: {e}") from e
        out.print(f"database at revision {current_revision(url)}")


# A key's rate limits (ponder/service/rate_limits.py), on `keys create` and `keys update`. Not given: the
# deployment's default (PONDER_RATE_LIMIT_*); 0: unlimited.
_DEFAULT = "default: PONDER_RATE_LIMIT_{}; 0 = unlimited"
RequestsPerMinute = Annotated[
    int | None, typer.Option(min=0, help=f"Job-creating requests per minute ({_DEFAULT.format('REQUESTS_PER_MINUTE')})")
]
TokensPerMinute = Annotated[
    int | None,
    typer.Option(
        min=0, help=f"Prompt + max tokens per minute, settled to usage ({_DEFAULT.format('TOKENS_PER_MINUTE')})"
    ),
]
TokensPerDay = Annotated[
    int | None, typer.Option(min=0, help=f"The same per day ({_DEFAULT.format('TOKENS_PER_DAY')})")
]
MaxConcurrentJobs = Annotated[
    int | None,
    typer.Option(
        min=0,
        help=f"Jobs queued or running at once, each counting its n samples ({_DEFAULT.format('MAX_CONCURRENT_JOBS')})",
    ),
]

Weight = Annotated[
    float | None,
    typer.Option(
        min=0.01,
        help="Fair share: a free slot goes to the key with the fewest running jobs per weight (default 1)",
    ),
]


def _limits(*values: float | None) -> dict[str, float | None]:
    """The options given, by name: the rate limits in LIMIT_FIELDS' order, then the weight."""
    from ponder.service.security import LIMIT_FIELDS

    return {name: value for name, value in zip((*LIMIT_FIELDS, "weight"), values, strict=True) if value is not None}


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option("--name", help="Who or what the key is for")],
    requests_per_minute: RequestsPerMinute = None,
    tokens_per_minute: TokensPerMinute = None,
    tokens_per_day: TokensPerDay = None,
    max_concurrent_jobs: MaxConcurrentJobs = None,
    weight: Weight = None,
) -> None:
    """Create an API key. The key is printed once, on the last line; only its hash is stored."""
    from sqlmodel import Session

    from ponder.service.db import sql_engine
    from ponder.service.security import create_api_key

    limits = _limits(requests_per_minute, tokens_per_minute, tokens_per_day, max_concurrent_jobs, weight)
    with cli_errors():
        if not name.strip() or len(name) > 100:
            raise CliError("--name must be 1-100 characters")
        with Session(sql_engine(get_settings())) as session:
            row, key = create_api_key(session, name.strip(), limits)
        console.print(f"created key {row.id} ({row.name}); store it now, it is not shown again")
        console.print(
            f"webhook signing secret for its jobs' webhook_url: {row.webhook_secret}", highlight=False, soft_wrap=True
        )
        print(key)


@keys_app.command("list")
def keys_list() -> None:
    """List API keys (prefixes only)."""
    from sqlmodel import Session, col, select

    from ponder.service.db import sql_engine
    from ponder.service.tables import ApiKey

    with cli_errors():
        with Session(sql_engine(get_settings())) as session:
            rows = session.exec(select(ApiKey).order_by(col(ApiKey.created_at))).all()
        table = Table()
        for column in ("id", "name", "prefix", "created", "revoked", "limits"):
            table.add_column(column)
        for row in rows:
            revoked = row.revoked_at.isoformat(timespec="seconds") if row.revoked_at else ""
            created = row.created_at.isoformat(timespec="seconds")
            table.add_row(str(row.id), row.name, row.prefix + "…", created, revoked, _describe_limits(row))
        out.print(table)


@keys_app.command("update")
def keys_update(
    key: Annotated[str, typer.Argument(help="The key's id or prefix")],
    requests_per_minute: RequestsPerMinute = None,
    tokens_per_minute: TokensPerMinute = None,
    tokens_per_day: TokensPerDay = None,
    max_concurrent_jobs: MaxConcurrentJobs = None,
    weight: Weight = None,
) -> None:
    """Change a key's rate limits (those given; 0 = unlimited) or its weight. The API applies them within
    PONDER_API_KEY_CACHE_SECONDS."""
    from sqlmodel import Session

    from ponder.service.db import sql_engine
    from ponder.service.security import set_key_limits

    limits = _limits(requests_per_minute, tokens_per_minute, tokens_per_day, max_concurrent_jobs, weight)
    with cli_errors():
        if not limits:
            raise CliError("nothing to change: give at least one limit (--requests-per-minute ...) or --weight")
        with Session(sql_engine(get_settings())) as session:
            row = set_key_limits(session, key, limits)
        if row is None:
            raise CliError(f"no key {key!r}")
        out.print(f"updated {row.id} ({row.name}): {_describe_limits(row)}")


def _describe_limits(row) -> str:
    from ponder.service.security import LIMIT_FIELDS

    shown = [f"{name}={getattr(row, name)}" for name in LIMIT_FIELDS if getattr(row, name) is not None]
    if row.weight != 1:
        shown.append(f"weight={row.weight:g}")
    return ", ".join(shown) or "the deployment's defaults"


@keys_app.command("revoke")
def keys_revoke(key: Annotated[str, typer.Argument(help="The key's id or prefix")]) -> None:
    """Revoke an API key: it stops working at once."""
    from sqlmodel import Session

    from ponder.service.db import sql_engine
    from ponder.service.security import revoke_api_key

    with cli_errors():
        with Session(sql_engine(get_settings())) as session:
            row = revoke_api_key(session, key)
        if row is None:
            raise CliError(f"no key {key!r}")
        out.print(f"revoked {row.id} ({row.name})")


@secrets_app.command("reencrypt")
def secrets_reencrypt() -> None:
    """After rotating PONDER_SECRET_KEY (the old key in PONDER_PREVIOUS_SECRET_KEYS): write every
    stored webhook signing secret again under the new key; then the old key can go."""
    from sqlmodel import Session

    from ponder.service.db import sql_engine
    from ponder.service.encryption import UndecryptableSecret
    from ponder.service.webhooks.endpoints import reencrypt_secrets

    with cli_errors():
        try:
            with Session(sql_engine(get_settings())) as session:
                count = reencrypt_secrets(session)
        except UndecryptableSecret as e:
            raise CliError(str(e)) from e
        out.print(f"{count} rows of secrets written under the current PONDER_SECRET_KEY")
