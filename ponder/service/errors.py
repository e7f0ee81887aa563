"""Every error the API returns is JSON: {"error": {"type", "message", "param", "code"}} with the
right status (OpenAI's shape, so its SDKs read Ponder's errors; `code` is a stable name for the
few errors a client may act on, else null)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("ponder.api")

# On every response (ponder/service/app.py:RequestId): a client's own, or one made for the request.
REQUEST_ID_HEADER = "x-request-id"

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
    def __init__(
        self,
        status_code: int,
        message: str,
        param: str | None = None,
        headers: dict | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status_code, self.message, self.param, self.headers, self.code = status_code, message, param, headers, code


def error_body(status_code: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    error = {"type": ERROR_TYPES.get(status_code, "server_error"), "message": message, "param": param, "code": code}
    return {"error": error}


def error_response(
    status_code: int, message: str, param: str | None = None, headers=None, code: str | None = None
) -> JSONResponse:
    return JSONResponse(error_body(status_code, message, param, code), status_code=status_code, headers=headers)


def describe_validation_error(errors: Sequence[Any]) -> tuple[str, str | None]:
    """(message, param) for pydantic's errors, from the first: FastAPI's request validation and
    the OpenAI routes' own checks of the JobCreate a request maps to say it the same way."""
    first: dict[str, Any] = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    location = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path", "header")]
    param = ".".join(location) or None
    message = first.get("msg", "invalid request").removeprefix("Value error, ")  # a validator's own words
    if first.get("type") == "extra_forbidden":
        message = f"unknown field {param!r}"
    elif first.get("type") == "json_invalid":
        message, param = "the body is not valid JSON", None  # (its location is a character offset)
    elif param is None and first.get("type") in ("model_attributes_type", "dict_type", "missing"):
        message = "the body must be a JSON object (Content-Type: application/json)"
    elif param:
        message = f"{param}: {message}"
    return message, param


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
                raise ApiError(400, message, param) from e
            except ApiError as e:
                if e.status_code != 422:
                    raise
                raise ApiError(400, e.message, e.param, e.headers, e.code) from e

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

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status_code, exc.message, exc.param, exc.headers, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = describe_validation_error(exc.errors())
        return error_response(422, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Starlette answers this one outside every middleware, so the request id is added here.
        request_id = getattr(request.state, "request_id", None)
        logger.exception("unhandled error on %s %s (request %s)", request.method, request.url.path, request_id)
        return error_response(500, "internal error", headers={REQUEST_ID_HEADER: request_id} if request_id else None)
