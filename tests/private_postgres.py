"""A PostgreSQL server of a test's own (initdb, pg_ctl), to restart and to crash under running work
without touching the machine's: `with private_postgres(tmp_path) as pg: ... pg.restart() ...`.

The server runs as the `postgres` user when the tests run as root (initdb refuses root); a machine
without initdb, or without that user while root, skips the test, saying why."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ponder.cli.devstack import free_port


@dataclass
class PrivatePostgres:
    directory: Path
    port: int
    user: str | None  # who the server runs as (None: this process's user)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *command: str) -> None:
        prefix = ["runuser", "-u", self.user, "--"] if self.user else []
        result = subprocess.run([*prefix, *command], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"{' '.join(command)}: {result.stdout}{result.stderr}"

    def start(self) -> None:
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1 -c fsync=on"
        self._run(
            "pg_ctl",
            "-D",
            str(self.directory / "data"),
            "-o",
            options,
            "-l",
            str(self.directory / "log"),
            "-w",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        """`fast`: a clean shutdown; `immediate`: a crash (no checkpoint: recovery at the next start)."""
        self._run("pg_ctl", "-D", str(self.directory / "data"), "-m", mode, "-w", "stop")

    def restart(self) -> None:
        self.stop("fast")
        self.start()


@contextlib.contextmanager
def private_postgres(workdir: Path = Path("/")) -> Iterator[PrivatePostgres]:
    if shutil.which("initdb") is None or shutil.which("pg_ctl") is None:
        pytest.skip("no initdb/pg_ctl on this machine: the PostgreSQL restart tests need a server of their own")
    user = None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root without a postgres user: initdb refuses root")
        user = "postgres"
    # Not under pytest's own folders (0700, root's): the server's user must reach its directory.
    directory = Path(tempfile.mkdtemp(prefix="ponder-postgres-", dir=workdir.anchor + "tmp"))
    if user:
        shutil.chown(directory, user)
    server = PrivatePostgres(directory, free_port(), user)
    server._run("initdb", "-D", str(directory / "data"), "-U", "postgres", "--auth=trust", "-E", "UTF8")
    server.start()
    try:
        yield server
    finally:
        with contextlib.suppress(AssertionError):
            server.stop("immediate")
        shutil.rmtree(directory, ignore_errors=True)
