"""Liveness and readiness."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service.api.deps import RedisDep
from service.db import ping
from service.streams import WORKER_KEY_PREFIX

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict:
    """The API process is up."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(redis: RedisDep) -> JSONResponse:
    """Ready when the database and Redis answer and at least one inference worker is alive."""
    checks: dict[str, Any] = {"database": _check(ping), "redis": "ok", "inference_workers": 0}
    try:
        await redis.ping()
        checks["inference_workers"] = len([key async for key in redis.scan_iter(match=WORKER_KEY_PREFIX + "*")])
    except Exception as e:  # report, do not raise: this endpoint exists to say what is down
        checks["redis"] = f"error: {e}"
    ready = checks["database"] == "ok" and checks["redis"] == "ok" and checks["inference_workers"] > 0
    return JSONResponse(
        {"status": "ready" if ready else "not ready", "checks": checks}, status_code=200 if ready else 503
    )


def _check(probe) -> str:
    try:
        probe()
        return "ok"
    except Exception as e:  # noqa: BLE001
        return f"error: {e}"
