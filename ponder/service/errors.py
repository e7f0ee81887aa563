"""The service's domain errors: what went wrong, in the caller's terms (no such job, a conflict, a
limit reached), raised by the rules and mapped to an answer in one place. `STATUS_CODES` is that
mapping: the HTTP layer answers each error with its status (ponder/api/errors.py), and a batch's
output line records the status its route would have answered (ponder/service/openai/batches.py).
The answer's body is OpenAI's shape, {"error": {"type", "message", "param", "code"}}, so its SDKs
read Ponder's errors; `code` is a stable name for the few errors a client may act on, else null."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class ServiceError(Exception):
    """A refusal or a failure a client is told about. `param`: the request field at fault;
    `code`: a stable name a client may act on; `headers`: what the answer carries beside its body
    (Retry-After, x-should-retry, ...)."""

    def __init__(
        self, message: str, param: str | None = None, *, code: str | None = None, headers: dict | None = None
    ) -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.headers = message, param, code, headers

    def about(self, param: str | None, message: str) -> ServiceError:
        """The same error said of another parameter (an OpenAI request's name for a JobCreate field)."""
        return type(self)(message, param, code=self.code, headers=self.headers)


class InvalidRequest(ServiceError):
    """A request that cannot be served as sent (a bad cursor, a file that is not JSONL, ...)."""


class Unauthenticated(ServiceError):
    """No API key, or one that is invalid or revoked."""


class NotFound(ServiceError):
    """No such object for this caller (another key's objects do not exist for it)."""


class Conflict(ServiceError):
    """The object's state forbids the action (cancel an ended job, reuse an Idempotency-Key)."""


class TooLarge(ServiceError):
    """A body or a file over its limit."""


class Unprocessable(ServiceError):
    """A well-formed request whose values do not validate (Ponder's own routes answer 422; the
    OpenAI routes answer 400, as OpenAI's servers do: `openai_status_code`)."""


class LimitExceeded(ServiceError):
    """A rate limit or a quota of the key: retry after the headers' delay, unless they say not to."""


class ClientClosed(ServiceError):
    """The client went away before its answer (only logs and metrics see the status)."""


class JobFailed(ServiceError):
    """The job ended without its answer (failed, or its streamed text diverged on a re-run)."""


class Unavailable(ServiceError):
    """The service cannot take the request now (at capacity): retry after Retry-After."""


class JobTimedOut(ServiceError):
    """The job expired before it finished."""


STATUS_CODES: dict[type[ServiceError], int] = {
    InvalidRequest: 400,
    Unauthenticated: 401,
    NotFound: 404,
    Conflict: 409,
    TooLarge: 413,
    Unprocessable: 422,
    LimitExceeded: 429,
    ClientClosed: 499,  # nginx's status for a request whose client went away
    JobFailed: 500,
    Unavailable: 503,
    JobTimedOut: 504,
}

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


def status_code_of(error: ServiceError) -> int:
    return next(STATUS_CODES[kind] for kind in type(error).__mro__ if kind in STATUS_CODES)


def openai_status_code(error: ServiceError) -> int:
    """The status an OpenAI route answers: 400 where Ponder's own routes answer 422."""
    status = status_code_of(error)
    return 400 if status == 422 else status


def error_body(status_code: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    error = {"type": ERROR_TYPES.get(status_code, "server_error"), "message": message, "param": param, "code": code}
    return {"error": error}


def body_of(error: ServiceError, status_code: int | None = None) -> dict:
    """The error's answer body, under its own status or the one given (an OpenAI route's)."""
    return error_body(status_code or status_code_of(error), error.message, error.param, error.code)


def describe_validation_error(errors: Sequence[Any]) -> tuple[str, str | None]:
    """(message, param) for pydantic's errors, from the first: FastAPI's request validation and
    the OpenAI routes' own checks of the JobCreate a request maps to say it the same way."""
    first: dict[str, Any] = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    # A union's tag in angle brackets (a tagged union's member, `Tag("<message>")`) is no field: left out.
    location = [
        str(part)
        for part in first.get("loc", ())
        if part not in ("body", "query", "path", "header") and not str(part).startswith("<")
    ]
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
