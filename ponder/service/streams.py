"""Live job output through Redis: each job's deltas go to a Redis stream (replayable from the
start, so a client that connects late or reconnects misses nothing); cancellations are broadcast
to the workers on a channel; workers keep a heartbeat key alive."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable
from functools import lru_cache
from typing import Any, NamedTuple

from redis.exceptions import ConnectionError as RedisConnectionError

from ponder.service.db import DATABASE_DOWN
from ponder.service.threads import read_row

CANCEL_CHANNEL = "ponder:cancel"
WORKER_KEY_PREFIX = "ponder:worker:"
DELTA_TYPES = ("reasoning", "content")
# A sample's tokens' log probabilities, for the OpenAI streams (ponder/service/logprobs.py: its
# segments), and the prompt's (packed, once: a legacy completion that echoes its prompt)
LOGPROBS_TYPE = "logprobs"
PROMPT_LOGPROBS_TYPE = "prompt_logprobs"
VALUE_TYPES = (LOGPROBS_TYPE, PROMPT_LOGPROBS_TYPE)
STREAM_ID_PATTERN = r"^\d{1,20}-\d{1,20}$"  # a Redis stream entry id: what Last-Event-ID carries
STREAM_ID_PART_MAX = 2**64 - 1
STREAM_UNAVAILABLE = "the live stream is unavailable; GET the job for its whole output"


def check_stream_id(value: str | None) -> str | None:
    """A Last-Event-ID that matched STREAM_ID_PATTERN, held to what Redis reads as an entry id: two
    unsigned 64-bit numbers (20 digits can be more, and XREAD would refuse it mid-stream)."""
    if value is not None and any(int(part) > STREAM_ID_PART_MAX for part in value.split("-")):
        raise ValueError(f"not a stream entry id: each part is at most {STREAM_ID_PART_MAX}")
    return value


@lru_cache(maxsize=4)
def _sync_redis(url: str):
    import redis

    return redis.Redis.from_url(url, decode_responses=True)


class JobSignals:
    """What a job tells the workers and what they tell back, through the blocking Redis client of
    `redis_url` (one per URL in the process): for threads, the workers and maintenance."""

    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url

    def publish_cancel(self, job_id: str) -> None:
        """Tell every worker; the one running the job aborts it at its next engine step."""
        _sync_redis(self.redis_url).publish(CANCEL_CHANNEL, job_id)

    def worker_alive(self, worker: str | None) -> bool:
        """Whether the worker's heartbeat key (refreshed by its engine loop, ponder/workers/tasks.py) is
        live. When Redis cannot say, the worker is taken as alive: an outage is nobody's fault."""
        if worker is None:
            return False
        try:
            return bool(_sync_redis(self.redis_url).exists(WORKER_KEY_PREFIX + worker))
        except RedisConnectionError:
            return True

    def expire_streams(self, job_ids, seconds: int) -> None:
        """Jobs ended without their worker (ponder/workers/maintenance.py): their streams go `seconds`
        from now, as a worker's own end would have them go."""
        keys = [stream_key(job_id) for job_id in job_ids]
        if keys:
            with _sync_redis(self.redis_url).pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.expire(key, seconds)
                pipe.execute()

    def delete_streams(self, job_ids) -> None:
        """Delete jobs' streams and their fences (erased jobs: ponder/service/retention.py). With the
        fence gone, a late write of the job's last worker adds nothing (ponder/workers/job_stream.py
        FENCED_XADD checks the owner)."""
        keys = [key for job_id in job_ids for key in (stream_key(job_id), stream_owner_key(job_id))]
        if keys:
            _sync_redis(self.redis_url).delete(*keys)


def stream_key(job_id: str | uuid.UUID) -> str:
    return f"ponder:stream:{job_id}"


def stream_owner_key(job_id: str | uuid.UUID) -> str:
    """Which attempt of the job may write its stream: `<attempt>:<worker>` (the claim it holds)."""
    return f"ponder:stream-owner:{job_id}"


def sse(event: str, data: dict[str, Any], event_id: str | None = None) -> str:
    head = f"id: {event_id}\n" if event_id else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


class JobEvent(NamedTuple):
    """One thing a job's stream says, as `read_job_events` yields it."""

    # reasoning, content, logprobs, prompt_logprobs, reset, rewind, error (the stream store is away), keepalive, done
    kind: str
    data: dict[str, Any]  # a delta {"delta": text[, "index"]}, a rewind's lengths to keep, an error; {} otherwise
    entry_id: str | None = None  # the stream entry it came from (what Last-Event-ID carries)
    job: Any = None  # on `done`: the job row, read fresh


def delta_data(fields: dict[str, str]) -> dict[str, Any]:
    """A delta entry as events carry it: {"delta"}, and the sample's "index" for samples 1..n-1 of
    an n-sample job (sample 0, the only one of most jobs, goes untagged)."""
    sample = int(fields.get("sample") or 0)
    return {"delta": fields.get("delta", "")} | ({"index": sample} if sample else {})


async def read_job_events(
    redis,
    job_id: str,
    load_job: Callable[[], Any],  # returns the job row (fresh) or None
    poll_seconds: float = 2.0,
    after: str | None = None,
) -> AsyncIterator[JobEvent]:
    """One job's events: its deltas as they come, then `done` with the row (a `keepalive` whenever
    `poll_seconds` pass without any). `job_events` writes them as SSE; the OpenAI-compatible chat
    route (ponder/service/openai/chat.py) as chat.completion chunks, or waits for `done`.

    Redis or the database going away mid-stream (a restart) does not end the events: they go on
    with keepalives and read on from the last entry once it answers again (a Redis restored from its AOF still
    has the stream). If the job ends while Redis is still away, an `error` comes before `done` (the
    row has the whole result). Events from stream entries carry the entry's id; `after` (a
    client's Last-Event-ID) starts after it. `load_job` blocks: it runs off the event loop, on the
    streams' own threads (ponder/service/threads.py:read_row)."""
    key = stream_key(job_id)
    last_id = after or "0-0"
    while True:
        try:
            try:
                replies = await redis.xread({key: last_id}, count=200, block=int(poll_seconds * 1000))
                stream_exists = bool(replies) or bool(await redis.exists(key))
            except RedisConnectionError:
                job = await read_row(load_job)
                if job is None:
                    return
                if job.is_final:
                    yield JobEvent("error", {"type": "stream_unavailable", "message": STREAM_UNAVAILABLE})
                    yield JobEvent("done", {}, job=job)
                    return
                yield JobEvent("keepalive", {"comment": "keepalive (the stream store is unavailable; retrying)"})
                await asyncio.sleep(poll_seconds / 2)
                continue
            for _, entries in replies or []:
                for entry_id, fields in entries:
                    last_id = entry_id
                    kind = fields.get("type")
                    if kind in DELTA_TYPES or kind in VALUE_TYPES:
                        yield JobEvent(kind, delta_data(fields), entry_id)
                    elif kind == "reset":  # a retried job starts over: drop what was shown
                        yield JobEvent("reset", {}, entry_id)
                    elif kind == "rewind":  # a resumed job: keep only this much of each text
                        yield JobEvent("rewind", json.loads(fields.get("delta") or "{}"), entry_id)
                    elif kind == "done":
                        yield JobEvent("done", {}, entry_id, await read_row(load_job))
                        return
            if not replies:
                job = await read_row(load_job)
                if job is None:
                    return
                if job.is_final:
                    if not stream_exists:
                        # Finished before (or without) streaming, or its stream expired: replay the stored text.
                        for kind, text in (("reasoning", job.reasoning_content), ("content", job.content)):
                            if text:
                                yield JobEvent(kind, {"delta": text})
                    # Otherwise every delta is in the stream already (a worker appends them before it
                    # writes the result), and a job that maintenance ended (cancelled or failed with its
                    # worker gone) never gets `done` appended: the row says it is over.
                    yield JobEvent("done", {}, job=job)
                    return
                yield JobEvent("keepalive", {"comment": "keepalive"})
        except DATABASE_DOWN:  # the database away (a restart): wait for it as for Redis
            yield JobEvent("keepalive", {"comment": "keepalive (the database is unavailable; retrying)"})
            await asyncio.sleep(poll_seconds / 2)


async def job_events(
    redis,
    job_id: str,
    load_job: Callable[[], Any],  # returns the job row (fresh) or None
    final_event: Callable[[Any], dict[str, Any]],
    poll_seconds: float = 2.0,
    after: str | None = None,
) -> AsyncIterator[str]:
    """Server-sent events for one job (`read_job_events`; its log probabilities left out): each
    event with its entry's `id:`, `done` with `final_event(row)`, keepalives as SSE comments."""
    async for event in read_job_events(redis, job_id, load_job, poll_seconds, after):
        if event.kind == "keepalive":
            yield f": {event.data['comment']}\n\n"
        elif event.kind == "done":
            yield sse("done", final_event(event.job), event.entry_id)
        elif event.kind not in VALUE_TYPES:  # packed values: GET /v1/jobs/{id} shows them
            yield sse(event.kind, event.data, event.entry_id)
