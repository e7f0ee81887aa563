"""Every error the API returns is JSON: {"error": {"type", "message", "param"}} with the right status."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("ponder.api")

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "request_too_large",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


class ApiError(Exception):
    def __init__(self, status_code: int, message: str, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status_code, self.message, self.param, self.headers = status_code, message, param, headers


def error_response(status_code: int, message: str, param: str | None = None, headers=None) -> JSONResponse:
    body = {"error": {"type": ERROR_TYPES.get(status_code, "server_error"), "message": message, "param": param}}
    return JSONResponse(body, status_code=status_code, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status_code, exc.message, exc.param, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        first: dict[str, Any] = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        location = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path", "header")]
        param = ".".join(location) or None
        message = first.get("msg", "invalid request")
        if first.get("type") == "extra_forbidden":
            message = f"unknown field {param!r}"
        elif first.get("type") == "json_invalid":
            message = "the body is not valid JSON"
        elif param is None and first.get("type") in ("model_attributes_type", "dict_type", "missing"):
            message = "the body must be a JSON object (Content-Type: application/json)"
        elif param:
            message = f"{param}: {message}"
        return error_response(422, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal error")
