"""A batch's input file, read as a stream of lines (never whole): each line one request,
`{"custom_id", "method": "POST", "url", "body"}`.

Two passes (ponder/workers/batches.py). `check_file` finds what makes the file invalid as a whole (not
JSONL, a wrong method or url, a duplicate custom_id, too many lines, a line longer than a request
may be) and the batch fails with no job made; `batch_lines` then yields each line's request. A
line whose body the endpoint refuses is not the file's fault: it fails alone (ponder/service/openai/batches.py).
Memory is one line (at most `max_line_bytes`) plus the set of custom_ids seen."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

LINE_FIELDS = {"custom_id", "method", "url", "body"}
MAX_CUSTOM_ID = 512  # characters (Job.batch_custom_id)
MAX_REPORTED_PROBLEMS = 100  # a batch's `errors`: the first ones; the check stops there


@dataclass(frozen=True)
class BatchLine:
    number: int  # the file's line number, from 1
    custom_id: str
    body: dict[str, Any]


@dataclass(frozen=True)
class LineProblem:
    """What makes the file invalid (a batch's `errors.data[]`)."""

    code: str
    message: str
    line: int | None = None
    param: str | None = None


def read_lines(file: BinaryIO, max_line_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """(line number, its bytes) for every line that is not blank; None for a line longer than
    `max_line_bytes`, which is skipped over without being held."""
    number = 0
    while line := file.readline(max_line_bytes + 1):
        number += 1
        if len(line) > max_line_bytes and not line.endswith(b"\n"):
            while (rest := file.readline(1 << 16)) and not rest.endswith(b"\n"):
                pass
            yield number, None
        elif line.strip():
            yield number, line


def parse_line(number: int, raw: bytes | None, endpoint: str, max_line_bytes: int) -> BatchLine | LineProblem:
    """One line's request, or why the file is invalid there."""
    if raw is None:
        return LineProblem("line_too_long", f"the line is longer than {max_line_bytes} bytes", number)
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return LineProblem("invalid_json_line", "the line is not a JSON object", number)
    if not isinstance(value, dict):
        return LineProblem("invalid_json_line", "the line is not a JSON object", number)
    if missing := sorted(LINE_FIELDS - value.keys()):
        return LineProblem("missing_required_parameter", f"the line has no {missing[0]!r}", number, missing[0])
    if unknown := sorted(value.keys() - LINE_FIELDS):
        return LineProblem("invalid_request", f"unknown field {unknown[0]!r}", number, unknown[0])
    custom_id, method, url, body = (value[name] for name in ("custom_id", "method", "url", "body"))
    if not isinstance(custom_id, str) or not 0 < len(custom_id) <= MAX_CUSTOM_ID:
        message = f"custom_id must be a string of 1 to {MAX_CUSTOM_ID} characters"
        return LineProblem("invalid_request", message, number, "custom_id")
    if method != "POST":
        return LineProblem("invalid_method", f"method must be POST, not {method!r}", number, "method")
    if url != endpoint:
        message = f"url {url!r} is not the batch's endpoint {endpoint!r}: every line must use it"
        return LineProblem("invalid_url", message, number, "url")
    if not isinstance(body, dict):
        return LineProblem("invalid_request", "body must be a JSON object", number, "body")
    return BatchLine(number, custom_id, body)


def check_file(path: Path, endpoint: str, max_requests: int, max_line_bytes: int) -> list[LineProblem]:
    """Why the file is invalid as a whole (the first MAX_REPORTED_PROBLEMS reasons); [] when its
    lines can be run."""
    problems: list[LineProblem] = []
    seen: set[str] = set()
    with path.open("rb") as file:
        for number, raw in read_lines(file, max_line_bytes):
            parsed = parse_line(number, raw, endpoint, max_line_bytes)
            if isinstance(parsed, BatchLine) and parsed.custom_id in seen:
                message = f"custom_id {parsed.custom_id!r} is used by an earlier line: each must be unique"
                parsed = LineProblem("duplicate_custom_id", message, number, "custom_id")
            if isinstance(parsed, LineProblem):
                problems.append(parsed)
                if len(problems) >= MAX_REPORTED_PROBLEMS:
                    break
                continue
            seen.add(parsed.custom_id)
            if len(seen) > max_requests:
                message = f"the file has more than {max_requests} requests (PONDER_BATCH_MAX_REQUESTS)"
                return [*problems, LineProblem("too_many_requests", message, number)]
    if not seen and not problems:
        problems.append(LineProblem("empty_file", "the file has no requests"))
    return problems


def batch_lines(path: Path, endpoint: str, max_line_bytes: int, after: int = 0) -> Iterator[BatchLine]:
    """The requests of a file `check_file` passed, from the line after `after`."""
    with path.open("rb") as file:
        for number, raw in read_lines(file, max_line_bytes):
            if number > after:
                parsed = parse_line(number, raw, endpoint, max_line_bytes)
                assert isinstance(parsed, BatchLine), parsed  # check_file passed this file
                yield parsed
