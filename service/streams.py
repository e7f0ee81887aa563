"""Live job output through Redis: each job's deltas go to a Redis stream (replayable from the
start, so a client that connects late or reconnects misses nothing); cancellations are broadcast
to the workers on a channel; workers keep a heartbeat key alive."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable
from functools import lru_cache
from typing import Any

CANCEL_CHANNEL = "ponder:cancel"
WORKER_KEY_PREFIX = "ponder:worker:"
DELTA_TYPES = ("reasoning", "content")


@lru_cache(maxsize=1)
def _sync_redis():
    import redis

    from service.settings import get_settings

    return redis.Redis.from_url(get_settings().redis_url, decode_responses=True)


def publish_cancel(job_id: str) -> None:
    """Tell every worker; the one running the job aborts it at its next engine step."""
    _sync_redis().publish(CANCEL_CHANNEL, job_id)


def stream_key(job_id: str | uuid.UUID) -> str:
    return f"ponder:stream:{job_id}"


def sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


async def job_events(
    redis,
    job_id: str,
    load_job: Callable[[], Any],  # returns the job row (fresh) or None
    final_event: Callable[[Any], dict[str, Any]],
    poll_seconds: float = 2.0,
) -> AsyncIterator[str]:
    """Server-sent events for one job: its deltas as they come, then `done` with the usage."""
    key = stream_key(job_id)
    last_id = "0-0"
    while True:
        replies = await redis.xread({key: last_id}, count=200, block=int(poll_seconds * 1000))
        for _, entries in replies or []:
            for entry_id, fields in entries:
                last_id = entry_id
                kind = fields.get("type")
                if kind in DELTA_TYPES:
                    yield sse(kind, {"delta": fields.get("delta", "")})
                elif kind == "reset":  # a retried job starts over: drop what was shown
                    yield sse("reset", {})
                elif kind == "done":
                    yield sse("done", final_event(load_job()))
                    return
        if not replies:
            job = load_job()
            if job is None:
                return
            if job.is_final and not await redis.exists(key):
                # Finished before (or without) streaming, or its stream expired: replay the stored text.
                for kind, text in (("reasoning", job.reasoning_content), ("content", job.content)):
                    if text:
                        yield sse(kind, {"delta": text})
                yield sse("done", final_event(job))
                return
            yield ": keepalive\n\n"
