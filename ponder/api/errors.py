"""Every error the API returns is JSON: {"error": {"type", "message", "param", "code"}} with the
right status. One handler answers the service's domain errors with their status codes
(ponder/service/errors.py STATUS_CODES); FastAPI's validation errors, Starlette's HTTP errors and
anything unexpected get the same shape."""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from ponder.service.errors import (
    InvalidRequest,
    ServiceError,
    Unprocessable,
    describe_validation_error,
    error_body,
    status_code_of,
)

logger = logging.getLogger("ponder.api")

# On every response (ponder/api/middleware.py:RequestId): a client's own, or one made for the request.
REQUEST_ID_HEADER = "x-request-id"


def error_response(
    status_code: int, message: str, param: str | None = None, headers=None, code: str | None = None
) -> JSONResponse:
    return JSONResponse(error_body(status_code, message, param, code), status_code=status_code, headers=headers)


def overloaded(retry_after: int) -> JSONResponse:
    message = "the server is at capacity; retry after the Retry-After header's seconds"
    return error_response(503, message, headers={"Retry-After": str(retry_after)}, code="overloaded")


def database_unavailable(retry_after: int) -> JSONResponse:
    message = "the database is unavailable; retry after the Retry-After header's seconds"
    return error_response(503, message, headers={"Retry-After": str(retry_after)}, code="database_unavailable")


def service_error_response(error: ServiceError) -> JSONResponse:
    """A domain error's answer: its status (STATUS_CODES), body and headers."""
    return error_response(status_code_of(error), error.message, error.param, error.headers, error.code)


class BadRequestRoute(APIRoute):
    """A route that answers 400, never 422, for a bad request, as OpenAI's servers do: its SDKs
    raise BadRequestError for 400 and UnprocessableEntityError for 422, and code written against
    OpenAI catches the first. (Ponder's own routes keep 422 for a body that does not validate.)"""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def bad_request_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as e:
                message, param = describe_validation_error(e.errors())
                raise InvalidRequest(message, param) from e
            except Unprocessable as e:
                raise InvalidRequest(e.message, e.param, code=e.code, headers=e.headers) from e

        return bad_request_handler


class ErrorDetail(BaseModel):
    type: str
    message: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """What every error answer is (error_body), as the OpenAPI schema documents it."""

    error: ErrorDetail


def document_errors(app: FastAPI) -> None:
    """The OpenAPI schema says what an error is: each operation's 422 (FastAPI would document its
    own `{"detail": [...]}`, which Ponder never sends) and every status it does not list (`default`)
    answer ErrorBody. Clients generated from the schema then read errors, and the fuzz test
    (tests/service/test_fuzz_api.py) holds every error answer to it."""
    build_schema = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build_schema()
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (ErrorDetail, ErrorBody):
            model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            model_schema.pop("$defs", None)  # each is in components/schemas
            schemas[model.__name__] = model_schema
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        error = {
            "description": "An error",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
        }
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                responses = operation.setdefault("responses", {})
                if "422" in responses:
                    responses["422"] = {**error, "description": "The request does not validate"}
                responses["default"] = error
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def install_error_handlers(app: FastAPI) -> None:
    document_errors(app)

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return service_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = describe_validation_error(exc.errors())
        return error_response(422, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404 and "endpoint" not in request.scope:  # no route matched: OpenAI's words
            return error_response(404, f"Invalid URL ({request.method} {request.url.path})")
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Starlette answers this one outside every middleware, so the request id is added here.
        request_id = getattr(request.state, "request_id", None)
        logger.exception("unhandled error on %s %s (request %s)", request.method, request.url.path, request_id)
        return error_response(500, "internal error", headers={REQUEST_ID_HEADER: request_id} if request_id else None)
