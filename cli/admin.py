"""`ponder db` and `ponder keys`: the schema and the API keys, straight on PONDER_DATABASE_URL."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from cli.console import CliError, cli_errors, console, out

keys_app = typer.Typer(help="API keys: create, list, revoke.", no_args_is_help=True)
db_app = typer.Typer(help="The database schema.", no_args_is_help=True)
secrets_app = typer.Typer(help="Webhook signing secrets at rest (PONDER_SECRET_KEY).", no_args_is_help=True)


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
    from sqlmodel import Session, col, select

    from service.db import get_engine
    from service.models import ApiKey

    with cli_errors():
        with Session(get_engine()) as session:
            rows = session.exec(select(ApiKey).order_by(col(ApiKey.created_at))).all()
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


@secrets_app.command("reencrypt")
def secrets_reencrypt() -> None:
    """After rotating PONDER_SECRET_KEY (the old key in PONDER_PREVIOUS_SECRET_KEYS): write every
    stored webhook signing secret again under the new key; then the old key can go."""
    from sqlmodel import Session

    from service.db import get_engine
    from service.encryption import UndecryptableSecret
    from service.webhooks.endpoints import reencrypt_secrets

    with cli_errors():
        try:
            with Session(get_engine()) as session:
                count = reencrypt_secrets(session)
        except UndecryptableSecret as e:
            raise CliError(str(e)) from e
        out.print(f"{count} rows of secrets written under the current PONDER_SECRET_KEY")
