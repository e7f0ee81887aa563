"""A batch's input file: what makes it invalid as a whole (each reason with its line), what its
lines are, and that it is read a line at a time (a line longer than a request may be is skipped
over, never held)."""

from __future__ import annotations

import io
import json

import pytest

from ponder.service.batch_input import BatchLine, LineProblem, batch_lines, check_file, parse_line, read_lines

URL = "/v1/chat/completions"
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def line(custom_id: str = "a", **changes) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": URL, "body": BODY} | changes)


def problems(tmp_path, text: str, max_requests: int = 100, max_line_bytes: int = 4096) -> list[tuple]:
    path = tmp_path / "input.jsonl"
    path.write_text(text)
    return [(p.code, p.line, p.param) for p in check_file(path, URL, max_requests, max_line_bytes)]


def test_a_valid_file_has_no_problem_and_its_lines_in_order(tmp_path):
    path = tmp_path / "input.jsonl"
    path.write_text(f"{line('a')}\n\n{line('b')}\r\n   \n{line('c')}")  # blank lines are skipped, CRLF too
    assert check_file(path, URL, 3, 4096) == []
    assert [(x.number, x.custom_id, x.body) for x in batch_lines(path, URL, 4096)] == [
        (1, "a", BODY),
        (3, "b", BODY),
        (5, "c", BODY),
    ]
    assert [x.custom_id for x in batch_lines(path, URL, 4096, after=3)] == ["c"]  # a resumed validation


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("not json\n", ("invalid_json_line", 1, None)),
        ("[1, 2]\n", ("invalid_json_line", 1, None)),
        (json.dumps({"custom_id": "a", "method": "POST", "url": URL}), ("missing_required_parameter", 1, "body")),
        (line(extra=1), ("invalid_request", 1, "extra")),
        (line(method="GET"), ("invalid_method", 1, "method")),
        (line(url="/v1/embeddings"), ("invalid_url", 1, "url")),
        (line(body=[1]), ("invalid_request", 1, "body")),
        (line(custom_id=""), ("invalid_request", 1, "custom_id")),
        (line(custom_id=7), ("invalid_request", 1, "custom_id")),
        (f"{line('a')}\n{line('a')}\n", ("duplicate_custom_id", 2, "custom_id")),
        ("\n\n", ("empty_file", None, None)),
    ],
)
def test_what_makes_a_file_invalid(tmp_path, text, expected):
    assert problems(tmp_path, text) == [expected]


def test_every_bad_line_is_reported_with_its_number(tmp_path):
    text = "\n".join([line("a"), "{", line("b", method="PUT"), line("a"), line("c")])
    assert problems(tmp_path, text) == [
        ("invalid_json_line", 2, None),
        ("invalid_method", 3, "method"),
        ("duplicate_custom_id", 4, "custom_id"),
    ]


def test_more_requests_than_allowed(tmp_path):
    text = "\n".join(line(str(i)) for i in range(4))
    assert problems(tmp_path, text, max_requests=3) == [("too_many_requests", 4, None)]
    assert problems(tmp_path, text, max_requests=4) == []


def test_a_line_longer_than_a_request_is_skipped_over_not_held(tmp_path):
    long = line("long", body={"model": "m", "messages": [{"role": "user", "content": "x" * 300_000}]})
    text = f"{line('a')}\n{long}\n{line('b')}\n"
    assert problems(tmp_path, text, max_line_bytes=1000) == [("line_too_long", 2, None)]
    # read_lines reads at most max_line_bytes + 1 bytes of a line, then skips the rest in 64 KB pieces
    seen = list(read_lines(io.BytesIO(text.encode()), 1000))
    assert [(n, raw is None) for n, raw in seen] == [(1, False), (2, True), (3, False)]
    exact = json.dumps({"k": "x" * 990})  # a line of exactly the limit (its newline not counted) is fine
    assert len(exact) <= 1000 and list(read_lines(io.BytesIO(f"{exact}\n".encode()), len(exact)))[0][1] is not None


def test_parse_line_names_what_is_wrong():
    assert parse_line(3, line("x").encode(), URL, 4096) == BatchLine(3, "x", BODY)
    assert parse_line(3, None, URL, 10) == LineProblem("line_too_long", "the line is longer than 10 bytes", 3)
    wrong_url = parse_line(1, line(url="/v1/responses").encode(), URL, 4096)
    assert isinstance(wrong_url, LineProblem) and "/v1/responses" in wrong_url.message and URL in wrong_url.message
