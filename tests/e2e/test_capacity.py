"""Capacity of one API process (ponder/api/capacity.py, docs/operations.md#capacity), on a real
uvicorn API over real Redis and PostgreSQL:

- 200 SSE streams at once hold no database connection and do not slow the API: /healthz and new
  submissions answer within normal latency while they stream; a key's streams are capped (429 with
  Retry-After beyond), and a client that disconnects gives its slot back.
- A flood of submissions on a process with a small pool, few threads and a low in-flight limit is
  answered 202 or 503 with Retry-After, never 500, and every 202'd job exists (and no other).
No inference worker runs: the jobs stay queued, which is what a crowd of waiting streams looks like."""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import statistics
import time
import uuid
from collections import Counter

import httpx
import pytest
import redis
from sqlalchemy import text

from ponder.api.capacity import MAX_KEY_RETRY_AFTER_SECONDS, STREAMS_RETRY_AFTER_SECONDS, InFlightLimit
from ponder.cli.devstack import start_private_redis
from ponder.service.db import database_engine
from tests.stack import database, make_stack, ponder, start_redis

BODY = {"messages": [{"role": "user", "content": "Capacity test."}], "max_tokens": 4}
STREAMS = 200
PRIVATE_REDIS = "private_redis"  # in an `api` param: a Redis server of the test's own


@pytest.fixture
def api(tmp_path, request):
    """A Ponder API process on PostgreSQL with the settings the test gives (`request.param`)."""
    # Not the session stack's database (start_redis's default), which this process may still be
    # using: the flush would delete its Celery bindings, and Flower would see no more task events.
    settings = dict(request.param)
    if settings.pop(PRIVATE_REDIS, False):  # a server of its own: its command counts are the test's
        redis_url, redis_process = start_private_redis(tmp_path / "redis", persistent=False)
    else:
        redis_url, redis_process = start_redis(tmp_path, db=int(os.environ.get("PONDER_TEST_REDIS_DB", 13)) + 1)
    with database("postgresql", tmp_path) as url:
        stack = make_stack(tmp_path, url, redis_url)
        stack.start("api", **settings)
        try:
            stack.wait_api(timeout=120)
            yield stack
        finally:
            stack.stop_all()
            if redis_process is not None:
                redis_process.terminate()


def connections(database_url: str) -> int:
    """Connections open to the test's database, other than this one."""
    name = database_url.rsplit("/", 1)[1]
    with database_engine(database_url).connect() as connection:
        query = "SELECT count(*) FROM pg_stat_activity WHERE datname = :name AND pid <> pg_backend_pid()"
        return int(connection.execute(text(query), {"name": name}).scalar_one())


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


# The pool: 4 + 6 = 10 connections = api_max_in_flight 6 + STREAM_DB_THREADS 4.
SMALL_POOL = {"db_pool_size": 4, "db_max_overflow": 6, "api_max_in_flight": 6, "max_streams_per_key": STREAMS + 2}


@pytest.mark.parametrize("api", [SMALL_POOL], indirect=True)
def test_200_streams_hold_no_connection_and_the_api_keeps_answering(api):
    headers = {"Authorization": f"Bearer {api.api_key}"}
    with api.client() as client:
        job_ids = [client.post("/v1/jobs", json=BODY).json()["id"] for _ in range(20)]

    async def scenario() -> dict:
        limits = httpx.Limits(max_connections=STREAMS + 50, max_keepalive_connections=STREAMS + 50)
        timeout = httpx.Timeout(60, read=120)
        async with httpx.AsyncClient(base_url=api.base_url, headers=headers, limits=limits, timeout=timeout) as http:
            opened, stop = asyncio.Semaphore(0), asyncio.Event()
            statuses: list[int] = []

            async def follow(job_id: str) -> None:
                """Open the stream as an SDK would (a 503 retried after a pause) and hold it open."""
                while True:
                    async with http.stream("GET", f"/v1/jobs/{job_id}/stream") as response:
                        if response.status_code == 503:  # more opening at once than the in-flight limit
                            assert response.headers["retry-after"].isdigit()
                            await asyncio.sleep(0.1 + random.random() / 2)  # Retry-After, shortened
                            continue
                        statuses.append(response.status_code)
                        opened.release()
                        if response.status_code == 200:
                            await stop.wait()
                        return

            async def one_more() -> tuple[int, httpx.Headers, bytes]:
                """Open a stream and close it at once: its status, headers and (an error's) body."""
                async with http.stream("GET", f"/v1/jobs/{job_ids[0]}/stream") as response:
                    body = await response.aread() if response.status_code != 200 else b""
                    return response.status_code, response.headers, body

            followers = [asyncio.create_task(follow(job_ids[i % len(job_ids)])) for i in range(STREAMS)]
            for _ in range(STREAMS):
                await asyncio.wait_for(opened.acquire(), timeout=120)
            await asyncio.sleep(3)  # every stream past its first poll of the row
            held = await asyncio.to_thread(connections, api.env["PONDER_DATABASE_URL"])

            health, submits = [], []
            for _ in range(40):
                start = time.perf_counter()
                assert (await http.get("/healthz")).status_code == 200
                health.append(time.perf_counter() - start)
                start = time.perf_counter()
                submitted = await http.post("/v1/jobs", json=BODY)
                submits.append(time.perf_counter() - start)
                assert submitted.status_code == 202, submitted.text
                await asyncio.sleep(0.05)

            # the key may have STREAMS + 2: two more fit, the third is refused
            extra = [asyncio.create_task(follow(job_ids[0])) for _ in range(2)]
            for _ in extra:
                await asyncio.wait_for(opened.acquire(), timeout=60)
            refused = await one_more()
            # a client that goes away gives its slot back
            followers[0].cancel()
            await asyncio.gather(followers[0], return_exceptions=True)
            readmitted = []
            for _ in range(100):
                readmitted.append((await one_more())[0])
                if readmitted[-1] == 200:
                    break
                await asyncio.sleep(0.1)
            stop.set()
            await asyncio.gather(*followers[1:], *extra, return_exceptions=True)
            return {
                "statuses": statuses,
                "held": held,
                "health": health,
                "submits": submits,
                "refused": refused,
                "readmitted": readmitted,
            }

    result = asyncio.run(scenario())
    assert result["statuses"][:STREAMS] == [200] * STREAMS
    # the pool's 10 at most (a stream holding one would need 200)
    assert result["held"] <= 10, result["held"]
    print(
        f"healthz p50 {statistics.median(result['health']) * 1000:.1f} ms p99 {p99(result['health']) * 1000:.1f} ms; "
        f"POST /v1/jobs p50 {statistics.median(result['submits']) * 1000:.1f} ms "
        f"p99 {p99(result['submits']) * 1000:.1f} ms; {result['held']} connections"
    )
    # normal latency, far from the 30 s pool timeout a held connection would make it wait
    assert p99(result["health"]) < 1.0 and p99(result["submits"]) < 1.0
    status, headers, body = result["refused"]
    assert status == 429 and headers["retry-after"].isdigit()
    assert json.loads(body)["error"]["code"] == "too_many_streams"
    assert result["readmitted"][-1] == 200, result["readmitted"]
    # every stream gave its slot back once its client went away
    client = redis.Redis.from_url(api.env["PONDER_REDIS_URL"])
    deadline = time.monotonic() + 30
    while client.zcard(next(iter(client.scan_iter("ponder:streams:*")), "none")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(client.zcard(key) for key in client.scan_iter("ponder:streams:*"))


# 3 + 4 = 7 connections = api_max_in_flight 3 + STREAM_DB_THREADS 4: three requests at a time.
TINY = {"db_pool_size": 3, "db_max_overflow": 4, "api_max_in_flight": 3, "db_pool_timeout": 2}


@pytest.mark.parametrize("api", [TINY], indirect=True)
def test_a_flood_is_answered_202_or_503_never_500(api):
    headers = {"Authorization": f"Bearer {api.api_key}"}

    async def flood() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=api.base_url, headers=headers, limits=limits, timeout=60) as http:
            return await asyncio.gather(*(http.post("/v1/jobs", json=BODY) for _ in range(150)))

    answers = asyncio.run(flood())
    by_status: dict[int, int] = {}
    for answer in answers:
        by_status[answer.status_code] = by_status.get(answer.status_code, 0) + 1
    print(f"answers by status: {by_status}")
    assert set(by_status) <= {202, 503}, by_status
    assert by_status.get(503, 0) > 0 and by_status.get(202, 0) > 0  # the flood did overflow, and work went on
    for answer in answers:
        if answer.status_code == 503:
            assert answer.headers["retry-after"].isdigit()
            assert answer.json()["error"]["code"] == "overloaded"
    accepted = {answer.json()["id"] for answer in answers if answer.status_code == 202}
    with database_engine(api.env["PONDER_DATABASE_URL"]).connect() as connection:
        stored = {str(row[0]) for row in connection.execute(text("SELECT id FROM jobs"))}
    assert stored == accepted  # every 202'd job exists, and no job was made for a refused request


# Four requests in flight, at most two of them one key's.
SHARED = TINY | {"api_max_in_flight": 4, "api_max_in_flight_per_key": 2, "db_pool_size": 4}


@pytest.mark.parametrize("api", [SHARED], indirect=True)
def test_one_keys_flood_leaves_room_for_another_key(api):
    """Before: the in-flight limit was the process's alone, and a key flooding it (each refusal
    tried again at once) left another key's requests only 503s."""
    other = ponder(["keys", "create", "--name", "other"], api.env).stdout.strip().splitlines()[-1]

    async def scenario() -> tuple[list[httpx.Response], list[httpx.Response]]:
        limits = httpx.Limits(max_connections=200)
        async with (
            httpx.AsyncClient(base_url=api.base_url, limits=limits, timeout=60) as http,
            httpx.AsyncClient(base_url=api.base_url, headers={"Authorization": f"Bearer {other}"}, timeout=60) as own,
        ):
            flooder = {"Authorization": f"Bearer {api.api_key}"}
            flood = asyncio.gather(*(http.post("/v1/jobs", json=BODY, headers=flooder) for _ in range(150)))
            await asyncio.sleep(0.05)  # the flood is in
            mine = [await own.post("/v1/jobs", json=BODY) for _ in range(10)]
            return await flood, mine

    flood, mine = asyncio.run(scenario())
    assert [answer.status_code for answer in mine] == [202] * 10
    statuses = {answer.status_code for answer in flood}
    assert 429 in statuses and statuses <= {202, 429}, statuses  # the flood alone never fills the process
    refused = [answer for answer in flood if answer.status_code == 429]
    assert {answer.json()["error"]["code"] for answer in refused} == {"too_many_requests_in_flight"}
    # the larger the crowd, the longer it is told to wait (each refusal was told 1 s before)
    waits = [int(answer.headers["retry-after"]) for answer in refused]
    assert min(waits) >= 1 and max(waits) > 1, waits


def test_a_crowd_refused_at_once_is_told_to_come_back_spread_over_the_minute():
    """Before: 2,000 calls refused within a second were told ceil(k / per_key) seconds, at most
    60: 1,520 of them were told 60 and came back within the same 0.2 s (abuse.py: the other key's
    submits waited 0.7 s behind them)."""
    limit = InFlightLimit(None, limit=16, per_key=8, streams_per_key=4, retry_after=1)
    while True:  # 2,000 refusals within one second (again, with another key, if a second began meanwhile)
        key_id = uuid.uuid4()
        waits = [limit._key_retry_after(key_id, STREAMS_RETRY_AFTER_SECONDS) for _ in range(2000)]
        if limit.refusals[key_id][1] == 2000:
            break
    assert STREAMS_RETRY_AFTER_SECONDS <= min(waits) and max(waits) <= MAX_KEY_RETRY_AFTER_SECONDS
    assert waits[: 8 * STREAMS_RETRY_AFTER_SECONDS] == [STREAMS_RETRY_AFTER_SECONDS] * 8 * STREAMS_RETRY_AFTER_SECONDS
    assert waits[8 * 59 : 8 * 60] == [60] * 8  # the ramp: one second more per 8 refusals
    busiest_second, crowd = Counter(waits).most_common(1)[0]
    assert crowd <= 100, (busiest_second, crowd)  # the ramp's 8, and ~1,500 spread over 31 seconds: ~50


# A body must start within 2 s and keep coming at 1 KiB/s; three requests in flight at a time.
SLOW_BODIES = TINY | {"api_body_grace_seconds": 2, "api_body_min_rate": 1024}


def half_sent(base_url: str, key: str | None, count: int) -> list[socket.socket]:
    """`count` connections that send a POST's headers (Content-Length: 100) and never its body."""
    host, port = base_url.removeprefix("http://").split(":")
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    head = f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    sockets = []
    for _ in range(count):
        connection = socket.create_connection((host, int(port)), timeout=30)
        connection.sendall(head.encode())
        sockets.append(connection)
    return sockets


def status_of(connection: socket.socket) -> int:
    """The status of the answer the connection gets (waiting for it), 0 if it closes without one."""
    line = connection.makefile("rb").readline()
    return int(line.split()[1]) if line else 0


@pytest.mark.parametrize("api", [SLOW_BODIES], indirect=True)
def test_bodies_that_never_come_hold_no_slot(api):
    """16 connections that send headers and no body took every slot of requests in flight before:
    each other request was a 503 until the client gave up. Without a key they are answered 401 at
    once; with one they wait for their body holding a socket, not a slot, and get a 408 once it is
    late."""
    strangers = half_sent(api.base_url, None, 16)
    started = time.monotonic()
    assert [status_of(c) for c in strangers] == [401] * 16
    assert time.monotonic() - started < 2  # at once, not after the grace
    waiting = half_sent(api.base_url, api.api_key, 16)
    started = time.monotonic()
    with httpx.Client(base_url=api.base_url, headers={"Authorization": f"Bearer {api.api_key}"}, timeout=10) as http:
        for _ in range(5):  # the key's other requests, meanwhile, are served
            assert http.get("/v1/models").status_code == 200
            assert http.post("/v1/jobs", json=BODY).status_code == 202
    assert time.monotonic() - started < 2  # before any of the half-sent requests was refused
    assert [status_of(c) for c in waiting] == [408] * 16
    assert time.monotonic() - started < 2 + 5  # at the grace's end, not the client's
    for connection in strangers + waiting:
        connection.close()


@pytest.mark.parametrize("api", [SLOW_BODIES], indirect=True)
def test_a_body_slower_than_the_minimum_rate_is_cut_off_but_a_steady_one_passes(api):
    key = {"Authorization": f"Bearer {api.api_key}"}
    padding = " " * 6000

    def body(bytes_per_second: int):
        payload = json.dumps({**BODY, "metadata": {"pad": "x"}}).encode()[:-1] + padding.encode() + b"}"
        for start in range(0, len(payload), 512):
            yield payload[start : start + 512]
            time.sleep(512 / bytes_per_second)

    with httpx.Client(base_url=api.base_url, headers=key, timeout=30) as http:
        steady = http.post("/v1/jobs", content=body(4096), headers={"Content-Type": "application/json"})
        assert steady.status_code == 202, steady.text  # 6 KB at 4 KiB/s: well above the rate
        slow = http.post("/v1/jobs", content=body(400), headers={"Content-Type": "application/json"})
        assert slow.status_code == 408, slow.text  # 6 KB at 400 B/s: 2 s + 1 s a KiB runs out
        assert "too slowly" in slow.json()["error"]["message"]


CHAT = {"model": "tiny-llama", "messages": [{"role": "user", "content": "Wait for me."}], "max_tokens": 4}


@pytest.mark.parametrize("api", [{"max_streams_per_key": 3, PRIVATE_REDIS: True}], indirect=True)
def test_waiting_calls_count_against_their_keys_streams(api):
    """A non-streamed chat completion or response waits on its job's stream as a stream does: it
    took a Redis connection without counting against anything before, so one key's waiting calls
    could exhaust the process's pool. No worker runs here: the jobs stay queued and the calls wait.
    A crowd of refused calls was a Redis script each, which one key's retries turned into a flood."""
    headers = {"Authorization": f"Bearer {api.api_key}"}
    client = redis.Redis.from_url(api.env["PONDER_REDIS_URL"], decode_responses=True)

    def slots_taken() -> int:
        return sum(client.zcard(key) for key in client.scan_iter("ponder:streams:*"))

    def scripts_run() -> int:
        stats = client.info("commandstats")
        return sum(stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in ("eval", "evalsha"))

    async def main() -> None:
        async with httpx.AsyncClient(base_url=api.base_url, headers=headers, timeout=10) as http:
            waiting = [asyncio.create_task(http.post("/v1/chat/completions", json=CHAT)) for _ in range(2)]
            waiting.append(asyncio.create_task(http.post("/v1/responses", json={"model": "tiny-llama", "input": "x"})))
            deadline = time.monotonic() + 10
            while slots_taken() < 3 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert slots_taken() == 3
            for refused in (
                await http.post("/v1/chat/completions", json=CHAT),
                await http.post("/v1/responses", json={"model": "tiny-llama", "input": "x"}),
            ):
                assert refused.status_code == 429, refused.text
                assert refused.json()["error"]["code"] == "too_many_streams"
            # A crowd of refused calls asks Redis once a moment (capacity.FULL_MEMO_SECONDS), not each time.
            scripts = scripts_run()
            for _ in range(20):
                assert (await http.post("/v1/chat/completions", json=CHAT)).status_code == 429
            assert scripts_run() - scripts <= 2
            background = await http.post(
                "/v1/responses", json={"model": "tiny-llama", "input": "x", "background": True}
            )
            assert background.status_code == 200, background.text  # answered at once: it holds no slot
            for task in waiting:  # the clients go away: their slots are given back
                task.cancel()
            await asyncio.gather(*waiting, return_exceptions=True)

    asyncio.run(main())
    deadline = time.monotonic() + 15
    while slots_taken() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert slots_taken() == 0


@pytest.mark.parametrize("api", [{}], indirect=True)
def test_a_revoked_keys_streams_and_waits_end(api):
    """A revoked key stopped working for new requests, while its open streams and waiting calls
    went on for as long as their jobs ran (here, no worker: for ever)."""
    created = ponder(["keys", "create", "--name", "soon revoked"], api.env)
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip().splitlines()[-1]
    headers = {"Authorization": f"Bearer {secret}"}

    async def main() -> tuple[list[str], httpx.Response]:
        async with httpx.AsyncClient(base_url=api.base_url, headers=headers, timeout=60) as http:
            job = (await http.post("/v1/jobs", json=BODY)).json()
            waiting = asyncio.create_task(http.post("/v1/chat/completions", json=CHAT))
            events: list[str] = []
            async with http.stream("GET", f"/v1/jobs/{job['id']}/stream") as stream:
                revoked = False
                async for line in stream.aiter_lines():
                    events.append(line)
                    if not revoked and line.startswith(":"):  # the first keepalive: the stream is open
                        result = await asyncio.to_thread(ponder, ["keys", "revoke", secret[:12]], api.env)
                        assert result.returncode == 0, result.stderr
                        revoked = True
            return events, await waiting

    started = time.monotonic()
    events, waited = asyncio.run(asyncio.wait_for(main(), timeout=60))
    assert "event: error" in events and any("was revoked" in line for line in events), events
    assert waited.status_code == 401, waited.text
    assert time.monotonic() - started < 30  # ended at the next poll, not never
