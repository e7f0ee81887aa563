"""PostgreSQL going away under a real API process (uvicorn, on a private PostgreSQL the test stops
and starts, tests/private_postgres.py): every route answers 503 with Retry-After while it is away,
never a 500, on the same kept-alive connection, and serves again once it is back."""

from __future__ import annotations

import os

import httpx

from tests.private_postgres import private_postgres
from tests.stack import make_stack, start_redis

JOB = {"prompt": "outage", "max_tokens": 2, "seed": 1}


def local_port(response: httpx.Response) -> int:
    """The client's side of the connection the response came on (the same one: kept alive)."""
    return response.extensions["network_stream"].get_extra_info("client_addr")[1]


def test_every_route_answers_503_while_the_database_is_away(tmp_path):
    """A stopped PostgreSQL made every request a 500 (OperationalError: connection refused), and the
    server then dropped the kept-alive connection."""
    redis_url, redis_process = start_redis(tmp_path, db=int(os.environ.get("PONDER_TEST_REDIS_DB", 13)) + 1)
    try:
        with private_postgres() as postgres:
            stack = make_stack(tmp_path, postgres.url, redis_url)
            stack.start("api")
            try:
                stack.wait_api(timeout=120)
                headers = {"Authorization": f"Bearer {stack.api_key}"}
                with httpx.Client(base_url=stack.base_url, headers=headers, timeout=30) as http:
                    job = http.post("/v1/jobs", json=JOB)
                    assert job.status_code == 202, job.text
                    port = local_port(job)
                    postgres.stop("fast")
                    answers = [
                        http.get("/v1/jobs"),
                        http.get(f"/v1/jobs/{job.json()['id']}"),
                        http.post("/v1/jobs", json=JOB),
                        http.get("/v1/usage"),
                        http.get("/v1/webhooks"),
                        http.get("/v1/files"),
                        http.post(
                            "/v1/chat/completions",
                            json={"model": "tiny-llama", "messages": [{"role": "user", "content": "x"}]},
                        ),
                    ]
                    for answer in answers:
                        assert answer.status_code == 503, (answer.request.url, answer.text)
                        assert answer.headers["retry-after"].isdigit()
                        assert answer.json()["error"]["code"] == "database_unavailable"
                        assert local_port(answer) == port  # the connection was kept
                    postgres.start()
                    again = http.get(f"/v1/jobs/{job.json()['id']}")
                    assert again.status_code == 200 and local_port(again) == port, again.text
                assert "Traceback" not in stack.log("api")
            finally:
                stack.stop_all()
    finally:
        if redis_process is not None:
            redis_process.terminate()
