"""PostgreSQL going away under the real stack (uvicorn, Celery workers, beat, on a private PostgreSQL
the test stops, crashes and starts, tests/private_postgres.py): every route answers 503 with
Retry-After while it is away, never a 500, on the same kept-alive connection; and jobs running
through a restart and a crash end as if nothing had happened."""

from __future__ import annotations

import os
import threading
import time

import httpx
from sqlalchemy import text

from benchmarks.faults import MODEL, STACK_SETTINGS, WEBHOOK_PATH, body, final_events_per_job, wait_deliveries_settled
from ponder.api.deps import get_session
from ponder.service.db import sql_engine
from ponder.service.settings import Settings
from tests.private_postgres import private_postgres
from tests.receiver import start_receiver
from tests.stack import make_stack, start_redis

JOB = {"prompt": "outage", "max_tokens": 2, "seed": 1}


def local_port(response: httpx.Response) -> int:
    """The client's side of the connection the response came on (the same one: kept alive)."""
    return response.extensions["network_stream"].get_extra_info("client_addr")[1]


def test_a_request_session_closed_after_the_database_crashed_raises_nothing(tmp_path):
    """The request's session closes after its answer went out; PostgreSQL crashing in between made
    that close (its rollback) raise, an error of a response already sent, and the server dropped
    the client's kept-alive connection (seen in the restart-and-crash run below, once)."""
    with private_postgres() as postgres:
        settings = Settings(_env_file=None, database_url=postgres.url)
        session_of_request = get_session(settings)
        session = next(session_of_request)
        assert session.execute(text("SELECT 1")).scalar() == 1  # a connection, in a transaction
        postgres.stop("immediate")
        session_of_request.close()  # raised OperationalError before
        sql_engine(settings).dispose()


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


JOBS = 2
# Still running through both outages on a fast machine (tiny-r1, as the fault run): the crash comes at
# a third, and the 8 s it lasts are far fewer than the ~530 steps left.
MAX_TOKENS = 800


class Poller:
    """A client polling every job (and the list) as fast as it can: each answer's status code, and
    what each job was said to be."""

    def __init__(self, client: httpx.Client, job_ids: list[str]) -> None:
        self.client, self.job_ids = client, job_ids
        self.codes: dict[int, int] = {}
        self.seen: dict[str, list[tuple[str, str | None]]] = {job_id: [] for job_id in job_ids}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            for job_id in self.job_ids:
                answer = self.client.get(f"/v1/jobs/{job_id}")
                self.codes[answer.status_code] = self.codes.get(answer.status_code, 0) + 1
                if answer.status_code == 200:
                    self.seen[job_id].append((answer.json()["status"], answer.json()["content"]))
            listing = self.client.get("/v1/jobs")
            self.codes[listing.status_code] = self.codes.get(listing.status_code, 0) + 1
            time.sleep(0.05)

    def finish(self, timeout: float = 120) -> None:
        """Stop, once every job was seen final (a busy machine's poller may lag the test's own look)."""
        deadline = time.monotonic() + timeout
        while not all(any(s not in ("queued", "running") for s, _ in seen) for seen in self.seen.values()):
            assert time.monotonic() < deadline, "the poller never saw every job final"
            time.sleep(0.1)
        self.stop.set()
        self.thread.join(timeout=60)
        self.client.close()


def job_now(client: httpx.Client, job_id: str) -> dict | None:
    """The job, or None while the database is away (503)."""
    answer = client.get(f"/v1/jobs/{job_id}")
    return answer.json() if answer.status_code == 200 else None


def wait_jobs(client: httpx.Client, job_ids: list[str], done, timeout: float = 900) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = [job_now(client, job_id) for job_id in job_ids]
        if all(job is not None and done(job) for job in jobs):
            return jobs  # type: ignore[return-value]
        time.sleep(0.2)
    raise AssertionError(f"the jobs did not get there in {timeout} s: {jobs}")


def test_jobs_and_clients_ride_out_a_restart_and_a_crash(tmp_path):
    """A clean restart (pg_ctl restart -m fast), then a crash (stop -m immediate, started 8 s later)
    while jobs run and a client polls: no answer is a 500, every job succeeds with the text of its
    undisturbed run, each gets one final webhook event, and no job said final ever says otherwise."""
    redis_url, redis_process = start_redis(tmp_path, db=int(os.environ.get("PONDER_TEST_REDIS_DB", 13)) + 1)
    receiver = start_receiver()
    try:
        with private_postgres() as postgres:
            stack = make_stack(tmp_path, postgres.url, redis_url, model=MODEL, **STACK_SETTINGS)
            for name in ("api", "beat", "webhooks-worker", "worker"):
                stack.start(name)
            try:
                stack.wait_ready()
                with stack.client() as client:
                    receiver.secrets[WEBHOOK_PATH] = [client.get("/v1/webhooks/default-secret").json()["secret"]]
                    hook = receiver.url + WEBHOOK_PATH
                    job_ids = [
                        client.post("/v1/jobs", json=body(i, MAX_TOKENS, hook)).json()["id"] for i in range(JOBS)
                    ]
                    poller = Poller(stack.client(), job_ids)

                    def generated(tokens: int):
                        return lambda job: job["status"] == "running" and job["progress"]["completion_tokens"] >= tokens

                    wait_jobs(client, job_ids, generated(MAX_TOKENS // 5))
                    postgres.restart()
                    wait_jobs(client, job_ids, generated(MAX_TOKENS // 3))
                    postgres.stop("immediate")
                    time.sleep(8)
                    postgres.start()
                    finals = wait_jobs(client, job_ids, lambda job: job["status"] not in ("queued", "running"))
                    poller.finish()
                    again = [client.post("/v1/jobs", json=body(i, MAX_TOKENS)).json()["id"] for i in range(JOBS)]
                    undisturbed = wait_jobs(client, again, lambda job: job["status"] not in ("queued", "running"))
                    wait_deliveries_settled(client, job_ids)
                assert set(poller.codes) <= {200, 503}, poller.codes
                assert poller.codes.get(503, 0) > 0  # the outages were seen
                assert [job["status"] for job in finals] == ["succeeded"] * JOBS
                assert [job["content"] for job in finals] == [job["content"] for job in undisturbed]
                assert final_events_per_job(receiver, job_ids) == dict.fromkeys(job_ids, 1)
                for job_id, seen in poller.seen.items():  # once final, always final, and the same
                    first_final = next(i for i, (status, _) in enumerate(seen) if status not in ("queued", "running"))
                    assert set(seen[first_final:]) == {seen[first_final]}, job_id
                for name in ("api", "worker", "webhooks-worker", "beat"):
                    assert stack.processes[name].poll() is None, f"{name} died:\n{stack.log(name)[-2000:]}"
            finally:
                stack.stop_all()
    finally:
        receiver.stop()
        if redis_process is not None:
            redis_process.terminate()
