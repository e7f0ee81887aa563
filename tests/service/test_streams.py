"""A job's SSE stream across a Redis restart (issue: after `kill -9` of Redis and its restart from
the AOF, a client's stream was cut mid-body, a broken chunked response). The endpoint's event
generator against a real redis-server that is killed and started again on the same port and data."""

from __future__ import annotations

import asyncio
import time
import uuid
from types import SimpleNamespace

import redis
import redis.asyncio

from ponder.cli.devstack import start_private_redis
from ponder.service.streams import job_events, stream_key


def without_id(event: str) -> str:
    return "".join(line for line in event.splitlines(keepends=True) if not line.startswith("id: "))


def test_events_carry_their_entry_ids_and_last_event_id_resumes_after_one(tmp_path):
    url, process = start_private_redis(tmp_path / "redis", persistent=False)
    job_id = str(uuid.uuid4())
    writer = redis.Redis.from_url(url)
    ids = [writer.xadd(stream_key(job_id), {"type": "content", "delta": d}).decode() for d in ("a", "b", "c")]
    writer.xadd(stream_key(job_id), {"type": "done", "delta": ""})
    job = SimpleNamespace(is_final=True)

    async def follow(after: str | None) -> list[str]:
        client = redis.asyncio.Redis.from_url(url, decode_responses=True)
        try:
            return [e async for e in job_events(client, job_id, lambda: job, lambda _: {}, after=after)]
        finally:
            await client.aclose()

    try:
        everything = asyncio.run(follow(None))
        again = asyncio.run(follow(ids[1]))  # a client that reconnects after receiving "b"
    finally:
        process.kill()
    assert [e.splitlines()[0] for e in everything[:3]] == [f"id: {i}" for i in ids]
    assert [without_id(e) for e in again] == ['event: content\ndata: {"delta": "c"}\n\n', "event: done\ndata: {}\n\n"]


def test_a_redis_restart_mid_stream_keeps_the_response_whole(tmp_path):
    data = (tmp_path / "redis").resolve()
    url, process = start_private_redis(data, persistent=True)
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    job_id = str(uuid.uuid4())
    key = stream_key(job_id)
    redis.Redis.from_url(url).xadd(key, {"type": "content", "delta": "one "})
    time.sleep(1.5)  # the AOF is fsynced every second
    job = SimpleNamespace(is_final=False)
    received: list[str] = []

    async def follow() -> None:
        client = redis.asyncio.Redis.from_url(url, decode_responses=True)
        events = job_events(client, job_id, lambda: job, lambda _: {"status": "succeeded"}, poll_seconds=0.2)
        received.append(await anext(events))
        process.kill()
        process.wait()
        received.append(await anext(events))  # Redis is gone: a keepalive, not an exception
        _, again = start_private_redis(data, persistent=True, port=port)  # from its AOF
        try:
            writer = redis.Redis(port=port)
            writer.xadd(key, {"type": "content", "delta": "two"})
            writer.xadd(key, {"type": "done", "delta": ""})
            received.extend([event async for event in events])
        finally:
            again.kill()
            await client.aclose()

    asyncio.run(asyncio.wait_for(follow(), timeout=60))
    received = [without_id(e) for e in received]
    deltas = [e for e in received if e.startswith("event: content")]
    assert deltas == ['event: content\ndata: {"delta": "one "}\n\n', 'event: content\ndata: {"delta": "two"}\n\n']
    assert received[1].startswith(": keepalive (the stream store is unavailable")
    assert received[-1] == 'event: done\ndata: {"status": "succeeded"}\n\n'


def test_a_job_that_ends_while_redis_is_away_ends_its_stream_cleanly(tmp_path):
    url, process = start_private_redis(tmp_path / "redis", persistent=False)
    job_id = str(uuid.uuid4())
    redis.Redis.from_url(url).xadd(stream_key(job_id), {"type": "content", "delta": "one "})
    job = SimpleNamespace(is_final=False)

    async def follow() -> list[str]:
        client = redis.asyncio.Redis.from_url(url, decode_responses=True)
        events = job_events(client, job_id, lambda: job, lambda _: {"status": "succeeded"}, poll_seconds=0.2)
        received = [await anext(events)]
        process.kill()
        process.wait()
        job.is_final = True  # the worker wrote its result to the database meanwhile
        received += [event async for event in events]
        await client.aclose()
        return received

    received = [without_id(e) for e in asyncio.run(asyncio.wait_for(follow(), timeout=60))]
    assert received[0] == 'event: content\ndata: {"delta": "one "}\n\n'
    assert received[1].startswith('event: error\ndata: {"type": "stream_unavailable"')
    assert received[-1] == 'event: done\ndata: {"status": "succeeded"}\n\n'
