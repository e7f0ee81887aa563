"""Liveness and readiness."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ponder.api.cached import Cached
from ponder.api.deps import RedisDep, SettingsDep
from ponder.service.db import ping, sql_engine
from ponder.service.settings import Settings
from ponder.service.streams import WORKER_KEY_PREFIX
from ponder.service.threads import read_row

router = APIRouter(tags=["health"])
logger = logging.getLogger("ponder.api")
UNAVAILABLE = "error: unavailable"  # a failing dependency's answer; the detail is logged


@router.get("/healthz")
def healthz() -> dict:
    """The API process is up."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "Not ready: `checks` says what is missing"}})
async def readyz(request: Request, redis: RedisDep, settings: SettingsDep) -> JSONResponse:
    """Ready when the database and Redis answer and at least one inference worker is alive (checked
    at most once a second per API process: the answer may be that old)."""
    checks = await request.app.state.readiness.get(READY_CACHE_SECONDS, redis, settings)
    ready = checks["database"] == "ok" and checks["redis"] == "ok" and checks["inference_workers"] > 0
    return JSONResponse(
        {"status": "ready" if ready else "not ready", "checks": checks}, status_code=200 if ready else 503
    )


READY_CACHE_SECONDS = 1.0


def readiness() -> Cached[dict[str, Any]]:
    """An app's checks (`app.state.readiness`), run at most once per READY_CACHE_SECONDS."""
    return Cached(_checks, {})


async def _checks(redis, settings: Settings) -> dict[str, Any]:
    # on the streams' row-read threads: a database that hangs neither freezes the event loop nor
    # takes the threads of the requests in flight
    database = await read_row(lambda: _check("database", lambda: ping(sql_engine(settings))))
    checks: dict[str, Any] = {"database": database, "redis": "ok", "inference_workers": 0}
    try:
        await redis.ping()
        checks["inference_workers"] = len([key async for key in redis.scan_iter(match=WORKER_KEY_PREFIX + "*")])
    except Exception:  # report, do not raise: this endpoint exists to say what is down
        logger.exception("readyz: Redis did not answer")
        checks["redis"] = UNAVAILABLE
    return checks


def _check(name: str, probe) -> str:
    """`ok`, or UNAVAILABLE: the exception (hosts, URLs, driver text) goes to the log only, never
    to whoever asks."""
    try:
        probe()
        return "ok"
    except Exception:
        logger.exception("readyz: the %s did not answer", name)
        return UNAVAILABLE
