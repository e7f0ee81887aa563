"""The SQL database: its SQLAlchemy engines (`sql_engine`, not the inference engine) and
migrations. SQLite (a file under ./var) by default, PostgreSQL (psycopg 3) in production; Alembic
is the only way the schema changes."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple, TypeVar

from sqlalchemy import Engine, event, text
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlmodel import Session, create_engine

from ponder.service.settings import Settings

logger = logging.getLogger("ponder.db")
T = TypeVar("T")

# What a database that is away raises (restarting, crashed, unreachable): a wait and a retry, never
# a failure of the work at hand (the API answers 503, ponder/api/capacity.py).
DATABASE_DOWN = (OperationalError, InterfaceError)

# Beside the `ponder` package in a checkout or an editable install; the working directory otherwise.
CHECKOUT_MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"
MIGRATIONS = next((p for p in (CHECKOUT_MIGRATIONS, Path.cwd() / "migrations") if p.is_dir()), CHECKOUT_MIGRATIONS)


def normalize_url(url: str) -> str:
    """`postgresql://` means psycopg 3 here (SQLAlchemy would pick psycopg2)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


class Pool(NamedTuple):
    """PostgreSQL's connection pool (SQLAlchemy's defaults where not given): the API's pool and its
    request threads are sized together (Settings._pool_holds_the_threads)."""

    size: int = 5
    overflow: int = 10
    timeout: float = 30.0

    @classmethod
    def of(cls, settings: Settings) -> Pool:
        return cls(settings.db_pool_size, settings.db_max_overflow, settings.db_pool_timeout)


SQLALCHEMY_POOL = Pool()


def sql_engine(settings: Settings, background: bool = False) -> Engine:
    """This process's engine of the settings' database: one per database, pool and role.
    `background`: the engine of the workers and maintenance, not of request handling.
    - PostgreSQL: their commits do not wait for the WAL flush. A crash can lose the last few
      hundred milliseconds of claims, progress and results, which the leases already recover
      from (the job runs again); the API's inserts keep synchronous commits (a 202 is on disk).
    - SQLite: only their connections checkpoint the WAL, so a request never pays for one."""
    return database_engine(settings.database_url, background, Pool.of(settings))


@lru_cache(maxsize=8)
def database_engine(url: str, background: bool = False, pool: Pool = SQLALCHEMY_POOL) -> Engine:
    """The engine of the database at `url` (`sql_engine` for the settings' database), kept for the
    process: a test or a CLI command that names its database."""
    url = normalize_url(url)
    if url.startswith("sqlite"):
        return _sqlite_engine(url, checkpoints=background)
    # UTC sessions: /v1/usage groups by date(finished_at), which follows the session time zone.
    options = "-c timezone=UTC" + (" -c synchronous_commit=off" if background else "")
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=pool.size,
        max_overflow=pool.overflow,
        pool_timeout=pool.timeout,
        connect_args={"options": options},
    )


def until_database_answers(action: Callable[[], T], patience_seconds: float, what: str) -> T:
    """`action()` (a whole transaction), run again while the database is away (a restart takes a
    second or so, a crash's recovery a few) for up to `patience_seconds`; then the error goes up.
    A worker's writes are fenced by its claim, so one run again after a commit whose answer was
    lost changes nothing twice (it finds the claim moved on: LostClaim)."""
    deadline, delay = time.monotonic() + patience_seconds, 0.2
    while True:
        try:
            return action()
        except DATABASE_DOWN as e:
            if time.monotonic() >= deadline:
                raise
            logger.warning("the database is unavailable (%s); %s again in %.1f s", type(e).__name__, what, delay)
            time.sleep(delay)
            delay = min(2 * delay, 2.0)


def durable(session: Session) -> None:
    """This transaction's commit waits for its WAL flush, whatever its engine's default (the
    workers' commits do not): what a client or a receiver is then told (a final state and its
    webhooks, a batch's end) must survive a crash of the database. SQLite's commits already do
    (synchronous=NORMAL in WAL mode loses the last ones only to a power cut)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SET LOCAL synchronous_commit TO on"))


def checkpoint(engine: Engine) -> None:
    """Fold SQLite's write-ahead log back into the database file (request connections never do)."""
    if engine.dialect.name == "sqlite":
        with engine.connect() as connection:
            connection.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")


def _sqlite_engine(url: str, checkpoints: bool) -> Engine:
    path = url.split(":///", 1)[-1]
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

    @event.listens_for(engine, "connect")
    def _pragmas(connection, _record) -> None:
        # WAL lets the API read while a worker writes; the busy timeout queues writers instead of failing.
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: commits are atomic and the file never corrupts; a power cut may lose
        # the last commits' durability (not their consistency), and commits stop waiting on fsync.
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        if not checkpoints:  # a commit that crosses the WAL threshold would checkpoint inline
            cursor.execute("PRAGMA wal_autocheckpoint=0")
        cursor.close()

    return engine


def ping(engine: Engine) -> None:
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))


def alembic_config(url: str):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    from alembic import command

    if normalize_url(url).startswith("sqlite"):
        database_engine(url)  # creates the file's folder
    command.upgrade(alembic_config(url), revision)


def current_revision(url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with database_engine(url).connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()
