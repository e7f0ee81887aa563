"""Abuse: one hostile key against `ponder up` while a second key works as usual (issue 24).

`ponder up` (API, inference worker on tiny-llama, webhooks worker, batches worker, beat, Flower,
SQLite, Redis) runs as a user starts it, in a private data directory. Then, all at once:
- **64 slow-body sockets**: requests whose headers say 1,000 bytes of body that come a byte every
  5 s (half with the hostile key, half with none), each reopened as soon as the API drops it;
- **8 slow webhook receivers** subscribed by the hostile key: each accepts the connection and
  answers a byte every 5 s, never a whole response;
- **2,000 waiting chat calls** from the hostile key: non-streamed `POST /v1/chat/completions`, each
  tried again after a refusal's Retry-After, for ever;
while the second key submits `POST /v1/jobs` at 5/s (each job with a short answer) to an
ordinary receiver that verifies every webhook with the independent `standardwebhooks` library.

Targets: every one of the second key's submits answered 202 with p99 < 200 ms, every one of its
jobs succeeded, and each one's `job.succeeded` webhook arrived, verified.

    python benchmarks/abuse.py [--seconds 60] [--rate 5] [--waiting-calls 2000]

prints `RESULT abuse ...` and exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from service_load import RawHttpPool, open_loop, percentile  # noqa: E402  (the same open-loop client)

from ponder.cli.devstack import DEV_KEY_FILE_NAME, free_port  # noqa: E402
from tests.receiver import start_receiver  # noqa: E402  (verifies with standardwebhooks)
from tests.stack import ponder_children  # noqa: E402

CHAT = {"model": "tiny-llama", "messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 64}
JOB = {"messages": [{"role": "user", "content": "Say one word."}], "max_tokens": 4}


class Attack:
    """The hostile key's three kinds of load, counted; `stop` ends them all."""

    def __init__(self, host: str, port: int, key: str) -> None:
        self.host, self.port, self.key = host, port, key
        self.stopping = asyncio.Event()
        self.counts: Counter[str] = Counter()

    async def slow_body(self, authenticated: bool) -> None:
        """Headers, then a byte of the promised body every 5 s; reopened a second after the API drops it."""
        auth = f"Authorization: Bearer {self.key}\r\n" if authenticated else ""
        head = (
            f"POST /v1/jobs HTTP/1.1\r\nHost: {self.host}\r\n{auth}Content-Type: application/json\r\n"
            "Content-Length: 1000\r\n\r\n{"
        ).encode()
        while not self.stopping.is_set():
            try:
                reader, writer = await asyncio.open_connection(self.host, self.port)
            except OSError:
                await asyncio.sleep(1)
                continue
            self.counts["slow_body_connections"] += 1
            writer.write(head)
            answer = asyncio.ensure_future(reader.read(200))
            while not self.stopping.is_set() and not answer.done():
                await asyncio.wait([answer], timeout=5)
                if not answer.done():
                    writer.write(b" ")
            if answer.done() and not answer.exception():
                status = answer.result().split(b" ", 2)[1:2]
                self.counts[f"slow_body_answered_{status[0].decode() if status else 'closed'}"] += 1
            answer.cancel()
            writer.close()
            await asyncio.sleep(1)  # then another socket: 64 open at a time, not a connection flood

    async def waiting_call(self) -> None:
        """A non-streamed chat call that waits for its answer; tried again after a refusal's Retry-After."""
        pool = RawHttpPool(self.host, self.port, {"Authorization": f"Bearer {self.key}"})
        raw = pool.encode("POST", "/v1/chat/completions", CHAT)
        while not self.stopping.is_set():
            status, headers, body = await pool.request(raw, timeout=600)
            code = json.loads(body)["error"]["code"] if status >= 400 and body else ""
            self.counts[f"chat_{status}{'_' + code if code else ''}"] += 1
            if status != 200:  # as OpenAI's SDK does: after the Retry-After the server asks for
                await asyncio.sleep(float(headers.get("retry-after", 1)))
        await pool.close()


async def slow_receiver(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Reads the request, then answers a byte every 5 s and never finishes."""
    try:
        await reader.read(65536)
        for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 100000:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(5)
    except (OSError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


def start_up(workdir: Path, redis_db: int) -> tuple[subprocess.Popen, dict, str]:
    env = {
        **os.environ,
        "PONDER_DATA_DIR": str(workdir),
        "PONDER_MODEL": "tiny-llama",
        "PONDER_API_PORT": str(free_port()),
        "PONDER_FLOWER_PORT": str(free_port()),
        "PONDER_WORKER_METRICS_PORT": str(free_port()),
        "PONDER_REDIS_URL": f"redis://127.0.0.1:6379/{redis_db}",
    }
    import redis

    try:
        redis.Redis.from_url(env["PONDER_REDIS_URL"]).flushdb()
    except redis.RedisError:
        env["PONDER_REDIS_URL"] = f"redis://127.0.0.1:{free_port()}/0"  # none answers: `ponder up` starts its own
    log = open(workdir / "up.log", "ab")  # noqa: SIM115 (the child writes to it)
    up = subprocess.Popen(
        [sys.executable, "-m", "ponder", "up"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    base_url = f"http://127.0.0.1:{env['PONDER_API_PORT']}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if up.poll() is not None:
            raise RuntimeError(f"ponder up exited; see {workdir}/up.log")
        try:
            if httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200 and (workdir / DEV_KEY_FILE_NAME).exists():
                return up, env, base_url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"ponder up was not ready in 600 s; see {workdir}/up.log")


def cpu_seconds(parent: int) -> dict[str, float]:
    """CPU time so far (user + system) of each `ponder` process `ponder up` started, by command."""
    ticks = os.sysconf("SC_CLK_TCK")
    seconds: dict[str, float] = {}
    for child in ponder_children(parent):
        seconds[child.command] = seconds.get(child.command, 0) + (int(child.stat[11]) + int(child.stat[12])) / ticks
    return seconds


def create_key(env: dict, name: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "ponder", "keys", "create", "--name", name], env=env, capture_output=True, text=True
    )
    if done.returncode:
        raise RuntimeError(done.stderr)
    return done.stdout.strip().splitlines()[-1].split()[-1]


def subscribe(client: httpx.Client, url: str) -> str:
    answer = client.post("/v1/webhooks", json={"url": url, "events": ["job.succeeded", "job.failed"]})
    answer.raise_for_status()
    return answer.json()["secret"]


def attack(host: str, port: int, key: str, args, ports: multiprocessing.Queue, stop, counts: multiprocessing.Queue):
    """The hostile key's load, in a process of its own (the second key's client must not share its
    event loop, nor its GIL): the slow receivers' ports go out first, the counts at the end."""

    async def main() -> None:
        servers = [await asyncio.start_server(slow_receiver, "127.0.0.1", 0) for _ in range(args.slow_receivers)]
        ports.put([server.sockets[0].getsockname()[1] for server in servers])
        hostile = Attack(host, port, key)
        tasks = [asyncio.create_task(hostile.slow_body(i % 2 == 0)) for i in range(args.slow_bodies)]
        tasks += [asyncio.create_task(hostile.waiting_call()) for _ in range(args.waiting_calls)]
        while not stop.is_set():
            await asyncio.sleep(0.5)
        hostile.stopping.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        counts.put(dict(hostile.counts))

    asyncio.run(main())


def wait_succeeded(base_url: str, victim: str, job_ids: list[str], timeout: float) -> Counter:
    statuses: Counter[str] = Counter()
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {victim}"}, timeout=30) as client:
        for job_id in job_ids:
            while True:
                answer = client.get(f"/v1/jobs/{job_id}")
                if answer.status_code != 200:  # counted: the second key's reads must get through too
                    statuses[f"get_{answer.status_code}"] += 1
                    print(f"GET /v1/jobs/{job_id}: {answer.status_code} {answer.text[:200]}", flush=True)
                    time.sleep(float(answer.headers.get("retry-after", 1)))
                    continue
                status = answer.json()["status"]
                if status not in ("queued", "running") or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            statuses[status] += 1
    return statuses


def run(args) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="ponder-abuse-"))
    up, env, base_url = start_up(workdir, args.redis_db)
    receiver = start_receiver()
    try:
        attacker = (workdir / DEV_KEY_FILE_NAME).read_text().strip()
        victim = create_key(env, "victim")
        with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {victim}"}) as client:
            receiver.secrets["/ok/victim"] = [subscribe(client, f"{receiver.url}/ok/victim")]

        host, port = base_url.removeprefix("http://").split(":")
        ports, counts_out, stop = multiprocessing.Queue(), multiprocessing.Queue(), multiprocessing.Event()
        attacker_process = multiprocessing.Process(
            target=attack, args=(host, int(port), attacker, args, ports, stop, counts_out), daemon=True
        )
        attacker_process.start()
        with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {attacker}"}) as client:
            for slow in ports.get(timeout=60):
                subscribe(client, f"http://127.0.0.1:{slow}/slow")
        time.sleep(args.warm_up)  # the attack in full swing before the measurement starts
        pool = RawHttpPool(host, int(port), {"Authorization": f"Bearer {victim}"})
        cpu_before, started = cpu_seconds(up.pid), time.monotonic()
        submits = asyncio.run(open_loop(pool, "POST", "/v1/jobs", args.rate, args.seconds, JOB))
        elapsed, cpu_after = time.monotonic() - started, cpu_seconds(up.pid)
        cpu = {name: round((cpu_after[name] - cpu_before.get(name, 0)) / elapsed, 2) for name in cpu_after}
        statuses = wait_succeeded(base_url, victim, submits["accepted"], args.job_timeout)
        wait_webhooks(receiver, submits["accepted"], args.webhook_timeout)
        stop.set()
        counts = counts_out.get(timeout=120)
        attacker_process.join(30)
        delivered = webhook_jobs(receiver)
    finally:
        receiver.stop()
        os.killpg(up.pid, signal.SIGINT)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
    accepted = submits["accepted"]
    return {
        "submits": len(submits["latencies"]),
        "accepted": len(accepted),
        "submit_statuses": dict(sorted(submits["statuses"].items())),
        "submit_p50_ms": round(statistics.median(submits["latencies"]), 1),
        "submit_p99_ms": round(percentile(submits["latencies"], 99), 1),
        # the five slowest: seconds into the measurement, milliseconds (a crowd of them at one moment,
        # or spread over the run?)
        "slowest_submits": [
            (round(sent - submits["trace"][0][0], 1), round(ms, 1))
            for sent, ms, _ in sorted(submits["trace"], key=lambda t: -t[1])[:5]
        ],
        "succeeded": statuses.get("succeeded", 0),
        "job_statuses": dict(statuses),
        "webhooks": len(set(accepted) & delivered),
        "attack": dict(sorted(counts.items())),
        "cpu_cores_while_submitting": cpu,
    }


def wait_webhooks(receiver, job_ids: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not set(job_ids) <= webhook_jobs(receiver):
        time.sleep(0.5)


def webhook_jobs(receiver) -> set[str]:
    """The jobs whose job.succeeded reached the ordinary receiver with a signature it verified."""
    done = set()
    for request in receiver.at("/ok/victim"):
        event = json.loads(request.body)
        if request.verified_by and event["type"] == "job.succeeded":
            done.add(event["data"]["id"])
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60, help="how long the second key submits")
    parser.add_argument("--rate", type=float, default=5, help="the second key's submits per second")
    parser.add_argument("--slow-bodies", type=int, default=64)
    parser.add_argument("--slow-receivers", type=int, default=8)
    parser.add_argument("--waiting-calls", type=int, default=2000)
    parser.add_argument("--warm-up", type=float, default=15, help="seconds of attack before measuring")
    parser.add_argument("--job-timeout", type=float, default=600)
    parser.add_argument("--webhook-timeout", type=float, default=120)
    parser.add_argument("--redis-db", type=int, default=11, help="a database of the machine's Redis, flushed")
    args = parser.parse_args()
    figures = run(args)
    print(json.dumps(figures, indent=1))
    met = (
        figures["accepted"] == figures["submits"]
        and figures["submit_p99_ms"] < 200
        and figures["succeeded"] == figures["accepted"]
        and figures["webhooks"] == figures["accepted"]
    )
    print(
        f"RESULT abuse slow_bodies={args.slow_bodies} slow_receivers={args.slow_receivers} "
        f"waiting_calls={args.waiting_calls} submits={figures['submits']} accepted={figures['accepted']} "
        f"submit_p50_ms={figures['submit_p50_ms']} submit_p99_ms={figures['submit_p99_ms']} "
        f"succeeded={figures['succeeded']} webhooks={figures['webhooks']} targets_met={met}"
    )
    sys.exit(0 if met else 1)


if __name__ == "__main__":
    main()
