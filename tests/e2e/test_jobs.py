"""Jobs through the real stack: HTTP API, Redis, Celery inference worker, beat, SQLite/PostgreSQL."""

from __future__ import annotations

import json
import os
import re
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
from sqlmodel import Session

from ponder.engine import SamplingParams
from ponder.service.db import database_engine
from ponder.service.logprobs import unpack
from ponder.service.prompts import prompt_token_ids
from ponder.service.schemas import JobCreate
from ponder.service.settings import Settings
from ponder.service.tables import Job, JobStatus, utcnow
from tests.stack import POISON_SEED, ponder, wait_final

SHARED = "Please think about the following question with great care before answering it: "
# The jobs a fault meets (a SIGKILL, a SIGTERM, a SIGSTOP) a few tokens in: long enough to be
# mid-way then on a fast machine, and each is run again undisturbed for its expected text.
FAULT_TOKENS = 600


def submit(client: httpx.Client, body: dict, **headers) -> dict:
    response = client.post("/v1/jobs", json=body, headers=headers)
    assert response.status_code == 202, response.text
    assert response.headers["Location"].endswith(f"/v1/jobs/{response.json()['id']}")
    return response.json()


def wait_running_with_output(client: httpx.Client, job_id: str, timeout: float = 180) -> dict:
    job = running_with_output(client, job_id, timeout)
    assert job is not None, f"job {job_id} ended before it was seen running"
    return job


def running_with_output(client: httpx.Client, job_id: str, timeout: float = 180) -> dict | None:
    """The job as first seen running with output; None when it ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] == "running" and job["progress"]["completion_tokens"] > 0:
            return job
        if job["status"] not in ("queued", "running"):
            return None
        time.sleep(0.05)
    raise AssertionError("the job never got going")


def offline_params(body: dict) -> SamplingParams:
    """The request's sampling settings, mapped here independently of the worker's own mapping
    (JobCreate.sampling_params, which the worker uses), so that a wrong mapping there fails this test."""
    return SamplingParams(
        temperature=body.get("temperature", 0.6),
        top_p=body.get("top_p", 1.0),
        top_k=body.get("top_k", -1),
        seed=body.get("seed"),
        max_tokens=body["max_tokens"],
        stop=body.get("stop") or [],
        max_reasoning_tokens=body.get("max_reasoning_tokens"),
        frequency_penalty=body.get("frequency_penalty", 0.0),
        presence_penalty=body.get("presence_penalty", 0.0),
        repetition_penalty=body.get("repetition_penalty", 1.0),
        logit_bias={int(token): bias for token, bias in body.get("logit_bias", {}).items()},
        min_p=body.get("min_p", 0.0),
        min_tokens=body.get("min_tokens", 0),
    )


def job_bodies() -> list[dict]:
    topics = ["rivers", "primes", "bridges", "music", "ice", "trees", "ships", "clocks"]
    bodies = []
    for i, topic in enumerate(topics):
        body = {
            "messages": [{"role": "user", "content": f"{SHARED}why do {topic} matter?"}],
            "max_tokens": 40 + 4 * i,
            "temperature": 0.0 if i % 3 == 0 else 0.8,
            "seed": 1000 + i,
        }
        if i == 5:
            body["max_reasoning_tokens"] = 10
        if i == 3:
            body |= {"frequency_penalty": 1.2, "presence_penalty": 0.4, "logit_bias": {"101": 4.0, "32": -3.0}}
        if i == 4:
            body |= {"repetition_penalty": 1.3, "min_p": 0.05, "min_tokens": 30}
        if i == 7:
            body = {"prompt": f"{SHARED}{topic}", "max_tokens": 48, "temperature": 0.7, "seed": 7}
        bodies.append(body)
    return bodies


def test_concurrent_jobs_match_offline_generation(stack, make_llm):
    bodies = job_bodies()
    with stack.client() as client, ThreadPoolExecutor(len(bodies)) as pool:
        # The first job alone: once its blocks are cached, the others' shared prefix must hit them.
        first = wait_final(client, submit(client, bodies[0])["id"])
        submitted = list(pool.map(lambda body: submit(client, body), bodies[1:]))
        jobs = [first] + [wait_final(client, job["id"]) for job in submitted]
    assert [job["status"] for job in jobs] == ["succeeded"] * len(bodies)

    settings = Settings(model="tiny-llama", _env_file=None)
    prompts = [prompt_token_ids(JobCreate(**body), settings) for body in bodies]
    offline = make_llm("tiny-llama", max_num_seqs=8).generate(prompts, [offline_params(b) for b in bodies])
    for job, expected, prompt in zip(jobs, offline, prompts, strict=True):
        assert job["content"] == expected.content
        assert job["reasoning_content"] == expected.reasoning_content
        assert job["answer"] == expected.answer
        assert job["finish_reason"] == expected.finish_reason
        usage = job["usage"]
        assert usage["prompt_tokens"] == len(prompt) == expected.usage.prompt_tokens
        assert usage["completion_tokens"] == expected.usage.completion_tokens
        assert usage["reasoning_tokens"] == expected.usage.reasoning_tokens
        assert 0 <= usage["cached_tokens"] <= usage["prompt_tokens"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        drafts = (usage["draft_tokens"], usage["accepted_draft_tokens"], usage["draft_acceptance_rate"])
        metrics = expected.metrics
        assert drafts == (metrics.num_draft_tokens, metrics.num_accepted_tokens, metrics.draft_acceptance_rate)
        timings = job["timings"]
        assert timings["created_at"] <= timings["started_at"] <= timings["first_token_at"] <= timings["finished_at"]
    assert max(job["max_batch_size"] for job in jobs) > 1, "the jobs never shared a forward pass"
    assert all(job["usage"]["cached_tokens"] >= 16 for job in jobs[1:6]), "the shared prefix was not reused"


def test_stream_reconstructs_the_stored_text(stack):
    body = {"messages": [{"role": "user", "content": "stream me"}], "max_tokens": 120, "temperature": 0.9, "seed": 3}
    with stack.client() as client:
        job = submit(client, body)
        events = read_stream(client, job["id"])
        final = wait_final(client, job["id"])
        assert events["done"]["usage"] == final["usage"] and events["done"]["status"] == "succeeded"
        assert events["reasoning"] == final["reasoning_content"] and events["content"] == final["content"]
        # A finished job streams too (replayed from Redis, or from the database once that expired).
        again = read_stream(client, job["id"])
        assert (again["reasoning"], again["content"]) == (events["reasoning"], events["content"])


def read_stream(client: httpx.Client, job_id: str) -> dict:
    collected = {"reasoning": "", "content": "", "done": None}
    with client.stream("GET", f"/v1/jobs/{job_id}/stream") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                if event == "done":
                    collected["done"] = data
                    break
                collected[event] += data["delta"]
    return collected


def long_job(client: httpx.Client) -> dict:
    # Greedy on tiny-llama: its random weights never emit EOS, so this runs its full length unless stopped.
    return submit(client, {"messages": [{"role": "user", "content": "go on"}], "max_tokens": 1500, "temperature": 0})


def test_cancel_a_running_job(stack):
    with stack.client() as client:
        job = long_job(client)
        wait_running_with_output(client, job["id"])
        response = client.post(f"/v1/jobs/{job['id']}/cancel")
        assert response.status_code == 200, response.text
        final = wait_final(client, job["id"])
        assert final["status"] == "cancelled" and final["finish_reason"] == "abort"
        assert 0 < final["usage"]["completion_tokens"] < 1500
        assert final["reasoning_content"], "the partial output is kept"
        conflict = client.post(f"/v1/jobs/{job['id']}/cancel")
        assert conflict.status_code == 409 and conflict.json()["error"]["type"] == "conflict_error"
    assert_engine_idle(stack)


def assert_engine_idle(stack, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = stack.worker_status()
        if status.get("in_flight") == 0 and status["free_blocks"] == status["total_blocks"]:
            return
        time.sleep(0.2)
    raise AssertionError(f"engine still holds blocks: {stack.worker_status()}")


def test_cancel_a_queued_job_never_runs(stack):
    with stack.client() as client:
        blockers = [long_job(client) for _ in range(8)]  # fill every worker slot
        for blocker in blockers:
            wait_running_with_output(client, blocker["id"])
        queued = submit(client, {"prompt": "wait your turn", "max_tokens": 5})
        assert client.get(f"/v1/jobs/{queued['id']}").json()["status"] == "queued"
        cancelled = client.post(f"/v1/jobs/{queued['id']}/cancel").json()
        assert cancelled["status"] == "cancelled"
        for blocker in blockers:
            client.post(f"/v1/jobs/{blocker['id']}/cancel")
        for blocker in blockers:
            assert wait_final(client, blocker["id"])["status"] == "cancelled"
        time.sleep(1.0)
        final = client.get(f"/v1/jobs/{queued['id']}").json()
        assert final["status"] == "cancelled" and final["attempts"] == 0 and final["timings"]["started_at"] is None


def test_a_task_delivered_twice_runs_once(stack):
    from celery import Celery

    sender = Celery(broker=stack.env["PONDER_REDIS_URL"])
    with stack.client() as client:
        job = long_job(client)
        wait_running_with_output(client, job["id"])
        sender.send_task("ponder.run_job", args=[job["id"]], queue="inference")  # a duplicate delivery
        time.sleep(1.0)
        client.post(f"/v1/jobs/{job['id']}/cancel")
        final = wait_final(client, job["id"])
        sender.send_task("ponder.run_job", args=[job["id"]], queue="inference")  # and one after it ended
        time.sleep(1.0)
        after = client.get(f"/v1/jobs/{job['id']}").json()
    assert final["attempts"] == 1 and after == final
    assert stack.log("worker").count(f"message for job {job['id']}: skipped") == 2


def test_killing_the_api_loses_no_job(stack):
    accepted: list[str] = []

    def submit_some(count: int) -> None:
        with stack.client() as client:
            for i in range(count):
                try:
                    response = client.post("/v1/jobs", json={"prompt": f"job {i}", "max_tokens": 8, "seed": i})
                except httpx.HTTPError:
                    continue  # the API died under this request: it was never accepted
                if response.status_code == 202:
                    accepted.append(response.json()["id"])

    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(submit_some, 200)
        while len(accepted) < 5:
            time.sleep(0.01)
        stack.kill("api")
        running.result()
    stack.start("api")
    stack.wait_api()
    with stack.client() as client:
        statuses = [wait_final(client, job_id)["status"] for job_id in accepted]
    assert statuses == ["succeeded"] * len(accepted)


def test_a_committed_job_whose_message_was_lost_still_runs(stack):
    """As if the API died between its commit and its send: maintenance sends it."""
    key = _key_id(stack)
    settings = Settings(model="tiny-llama", _env_file=None)
    body = JobCreate(prompt="orphan", max_tokens=6)
    with Session(database_engine(stack.env["PONDER_DATABASE_URL"])) as session:
        job = Job(
            api_key_id=key,
            model="tiny-llama",
            request=body.model_dump(mode="json", exclude_none=True),
            prompt_token_ids=prompt_token_ids(body, settings),
            prompt_tokens=len(prompt_token_ids(body, settings)),
            expires_at=utcnow().replace(year=utcnow().year + 1),
        )
        session.add(job)
        session.commit()
        job_id = str(job.id)
    with stack.client() as client:
        assert wait_final(client, job_id)["status"] == JobStatus.succeeded


def _key_id(stack) -> uuid.UUID:
    from ponder.service.security import find_active_key

    with Session(database_engine(stack.env["PONDER_DATABASE_URL"])) as session:
        return find_active_key(session, stack.api_key).id


def test_a_job_whose_worker_died_resumes_from_its_checkpoint(stack):
    """SIGKILL the worker mid-job: its lease runs out, maintenance re-queues the job, and a new
    worker resumes it from the tokens its last progress flush stored. The seeded job ends with the
    text an undisturbed run of it gives, usage counts each token once, and the stream does not
    start over: a client reading it gets the final text (after any rewind of what the dead worker
    streamed past its checkpoint). The tokens it resumed from keep the log probabilities the
    checkpoint stored with them, not values computed again."""
    body = {
        "messages": [{"role": "user", "content": "go on"}],
        "max_tokens": FAULT_TOKENS,
        "temperature": 1.0,
        "seed": 7,
    }
    body |= {"logprobs": True, "top_logprobs": 2}
    with stack.client() as client:
        job = submit(client, body)
        wait_progress(client, job["id"], 50)
        stack.kill("worker")
        with Session(database_engine(stack.env["PONDER_DATABASE_URL"])) as session:
            checkpoint = session.get(Job, uuid.UUID(job["id"])).checkpoint
        stack.start("worker")
        final = wait_final(client, job["id"])
        listed = next(j for j in client.get("/v1/jobs", params={"limit": 100}).json()["data"] if j["id"] == job["id"])
        events = read_stream_events(client, job["id"])
        undisturbed = wait_final(client, submit(client, body)["id"])
    assert final["status"] == "succeeded" and final["attempts"] == 2
    assert final["resumed_tokens"] >= 50 and final["restart_reason"] is None
    assert (final["content"], final["reasoning_content"]) == (undisturbed["content"], undisturbed["reasoning_content"])
    counted = ("prompt_tokens", "completion_tokens", "reasoning_tokens")  # (cached_tokens: the rerun's prefix hit)
    assert [final["usage"][k] for k in counted] == [undisturbed["usage"][k] for k in counted]  # each token once
    assert final["finish_reason"] == undisturbed["finish_reason"]
    assert "reset" not in [kind for kind, _ in events]
    assert streamed_text(events) == (final["reasoning_content"] or "", final["content"] or "")
    assert listed["logprobs"] is None and listed["content"] == final["content"]  # a list leaves the values out

    kept = [(v.token_id, v.logprob, v.top) for v in unpack(checkpoint["logprobs"])]
    assert len(kept) == len(checkpoint["token_ids"]) >= final["resumed_tokens"]
    shown = [(e, [(t["token"], t["logprob"]) for t in e["top_logprobs"]]) for e in final["logprobs"]["content"]]
    assert len(shown) == final["usage"]["completion_tokens"]
    assert [e["logprob"] for e, _ in shown[: len(kept)]] == [logprob for _, logprob, _ in kept]  # as stored
    again = [(e["token"], e["logprob"]) for e in undisturbed["logprobs"]["content"]]
    assert [e["token"] for e, _ in shown] == [token for token, _ in again]
    assert max(abs(e["logprob"] - logprob) for (e, _), (_, logprob) in zip(shown, again, strict=True)) < 1e-3


def wait_progress(client: httpx.Client, job_id: str, tokens: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while client.get(f"/v1/jobs/{job_id}").json()["progress"]["completion_tokens"] < tokens:
        assert time.monotonic() < deadline, f"job {job_id} never reached {tokens} tokens"
        time.sleep(0.05)


def test_a_request_that_faults_inside_the_engine_fails_alone(stack):
    """A request the engine cannot run (here its sampler raises, as a kernel fault would:
    tests/faults/sitecustomize.py) fails alone, at its first attempt; the seeded jobs sharing its
    batch succeed with the text an undisturbed run gives."""

    def body(seed: int) -> dict:
        return {"messages": [{"role": "user", "content": "go on"}], "max_tokens": 400, "temperature": 1.0, "seed": seed}

    with stack.client() as client:
        neighbours = [submit(client, body(i)) for i in range(3)]
        for job in neighbours:
            wait_progress(client, job["id"], 5)
        poisoned = wait_final(client, submit(client, body(POISON_SEED))["id"])
        finals = [wait_final(client, j["id"]) for j in neighbours]
        undisturbed = [wait_final(client, submit(client, body(i))["id"]) for i in range(3)]
    assert poisoned["status"] == "failed" and "injected fault" in poisoned["error"], poisoned
    assert (poisoned["attempts"], poisoned["faults"]) == (1, 0)  # not retried: the job's own fault
    isolated = [int(n) for n in re.findall(r"engine step failed with (\d+) requests", stack.log("worker"))]
    assert max(isolated) > 1, isolated  # it faulted inside a batch, its neighbours in it (a busy machine
    # may finish them before a status poll sees them running: the step's own count is the evidence)
    assert [j["status"] for j in finals] == ["succeeded"] * 3
    assert [j["content"] for j in finals] == [j["content"] for j in undisturbed]
    assert [j["usage"]["completion_tokens"] for j in finals] == [j["usage"]["completion_tokens"] for j in undisturbed]


def test_sigterm_hands_the_jobs_in_flight_to_another_worker_at_once(stack):
    """SIGTERM the worker with three jobs running: it checkpoints each and puts it back on the queue
    at once (queued, no lease to wait out) and exits within seconds; a second worker resumes all
    three, and each ends with the text an undisturbed run gives."""

    def body(i: int) -> dict:
        # Greedy on tiny-llama never ends early (no EOS), so all three are mid-way at the SIGTERM.
        return {"messages": [{"role": "user", "content": f"drain {i}"}], "max_tokens": FAULT_TOKENS, "temperature": 0}

    with stack.client() as client:
        jobs = [submit(client, body(i)) for i in range(3)]
        for job in jobs:
            wait_progress(client, job["id"], 20)
        sent = time.monotonic()
        stack.kill("worker", signal.SIGTERM)  # returns once the process exited
        exited_after = time.monotonic() - sent
        released = [client.get(f"/v1/jobs/{j['id']}").json() for j in jobs]
        released_by = [stack.worker_of(j["id"]) for j in jobs]
        stack.start("worker", label="worker-2", worker_metrics_port=0)  # the first one holds the stack's port
        try:
            finals = [wait_final(client, j["id"]) for j in jobs]
            undisturbed = [wait_final(client, submit(client, body(i))["id"]) for i in range(3)]
        finally:
            stack.kill("worker-2", signal.SIGTERM)
            stack.start("worker")  # the rest of the session's tests use "worker"
    assert exited_after < 15, exited_after
    for job, worker in zip(released, released_by, strict=True):  # by the drain itself, not a lease lapse later
        assert (job["status"], worker, job["attempts"]) == ("queued", None, 1), job
        assert job["progress"]["completion_tokens"] >= 20, job
    for final, expected in zip(finals, undisturbed, strict=True):
        assert final["status"] == "succeeded" and final["attempts"] == 2 and final["resumed_tokens"] >= 20
        assert final["content"] == expected["content"]
        assert final["usage"]["completion_tokens"] == expected["usage"]["completion_tokens"]


def test_a_stalled_worker_that_wakes_after_losing_its_job_changes_nothing(stack):
    """SIGSTOP the worker running a job until its lease lapses and a second worker has resumed the
    job, then SIGCONT it: its first write finds the job is no longer its own, so it aborts. The row,
    the text and the stream are the second worker's: the text of an undisturbed run."""
    body = {
        "messages": [{"role": "user", "content": "stall"}],
        "max_tokens": FAULT_TOKENS,
        "temperature": 1.0,
        "seed": 11,
    }
    with stack.client() as client:
        job = submit(client, body)
        wait_progress(client, job["id"], 30)
        stalled = stack.processes["worker"]
        first_worker = stack.worker_of(job["id"])
        stack.start("worker", label="worker-2", worker_metrics_port=0)  # the first one holds the stack's port
        try:
            os.killpg(stalled.pid, signal.SIGSTOP)
            deadline = time.monotonic() + 90
            while client.get(f"/v1/jobs/{job['id']}").json()["attempts"] < 2:
                assert time.monotonic() < deadline, takeover_report(stack, client, job["id"])
                time.sleep(0.1)
            os.killpg(stalled.pid, signal.SIGCONT)
            final = wait_final(client, job["id"])
            last_worker = stack.worker_of(job["id"])
            events = read_stream_events(client, job["id"])
            undisturbed = wait_final(client, submit(client, body)["id"])
        finally:
            os.killpg(stalled.pid, signal.SIGCONT)
            stack.kill("worker-2", signal.SIGTERM)
    assert final["status"] == "succeeded" and final["attempts"] == 2 and last_worker != first_worker
    assert "worker" not in final  # host names and pids are the operators' (the row), not the tenant's
    assert (final["content"], final["reasoning_content"]) == (undisturbed["content"], undisturbed["reasoning_content"])
    assert streamed_text(events) == (final["reasoning_content"] or "", final["content"] or "")
    assert "lost its claim on the job" in stack.log("worker")


def takeover_report(stack, client: httpx.Client, job_id: str) -> str:
    job = client.get(f"/v1/jobs/{job_id}").json()
    return f"never taken over: {job}\nbeat: {stack.log('beat')[-1500:]}\nworker-2: {stack.log('worker-2')[-1500:]}"


def read_stream_events(client: httpx.Client, job_id: str) -> list[tuple[str, dict]]:
    """(event, data) of every SSE event of the job's stream."""
    events, kind = [], None
    with client.stream("GET", f"/v1/jobs/{job_id}/stream") as response:
        for line in response.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: ") and kind is not None:
                events.append((kind, json.loads(line[6:])))
    return events


def streamed_text(events: list[tuple[str, dict]]) -> tuple[str, str]:
    """What a client following the stream shows: deltas appended, a rewind cutting back."""
    text = {"reasoning": "", "content": ""}
    for kind, data in events:
        if kind in text:
            text[kind] += data["delta"]
        elif kind == "rewind":
            text = {part: text[part][: data[part]] for part in text}
    return text["reasoning"], text["content"]


def test_a_job_with_n_samples_returns_each_with_usage_summed(stack):
    """n samples of one prompt as one job (the engine forks it after the prompt): the record holds
    every sample, usage counts the prompt once and sums the samples' tokens, sample 0 is the n=1
    job with the same seed, and the stream tags the other samples' deltas with their index."""
    body = {"messages": [{"role": "user", "content": "three ways"}], "max_tokens": 24, "temperature": 1.0, "seed": 5}
    with stack.client() as client:
        job = wait_final(client, submit(client, body | {"n": 3})["id"])
        single = wait_final(client, submit(client, body)["id"])
        events = read_stream_events(client, job["id"])
    assert job["status"] == "succeeded", job
    samples = job["samples"]
    assert [s["index"] for s in samples] == [0, 1, 2]
    assert job["usage"]["completion_tokens"] == sum(s["completion_tokens"] for s in samples) > 0
    assert job["usage"]["prompt_tokens"] == single["usage"]["prompt_tokens"]
    assert (samples[0]["content"], samples[0]["reasoning_content"]) == (single["content"], single["reasoning_content"])
    assert (job["content"], job["reasoning_content"]) == (single["content"], single["reasoning_content"])
    assert len({(s["reasoning_content"], s["content"]) for s in samples}) == 3  # three random streams
    streamed = {i: {"reasoning": "", "content": ""} for i in range(3)}
    for kind, data in events:
        if kind in ("reasoning", "content"):
            streamed[data.get("index", 0)][kind] += data["delta"]
    assert [(t["reasoning"], t["content"]) for t in streamed.values()] == [
        (s["reasoning_content"], s["content"]) for s in samples
    ]


def test_n_beyond_what_an_engine_runs_at_once_is_refused(stack):
    with stack.client() as client:
        response = client.post("/v1/jobs", json={"prompt": "x", "n": 9})  # the stack's engines run 8
    assert response.status_code == 422 and response.json()["error"]["param"] == "n", response.text


def test_the_prefix_cache_is_not_shared_between_api_keys(stack):
    """Block hashes are salted with the job's key: a tenant's repeated prompt hits the cache, the
    same prompt from another key computes it afresh (cached_tokens 0: nothing revealed)."""
    body = {"prompt": "a secret prompt that is long enough to fill several cache blocks " * 2, "max_tokens": 2}
    other = ponder(["keys", "create", "--name", f"tenant-{uuid.uuid4().hex[:6]}"], stack.env).stdout.split()[-1]
    with stack.client() as client, stack.client(other) as stranger:
        first = wait_final(client, submit(client, body)["id"])
        again = wait_final(client, submit(client, body)["id"])
        theirs = wait_final(stranger, submit(stranger, body)["id"])
    assert first["usage"]["prompt_tokens"] >= 32, first
    assert again["usage"]["cached_tokens"] >= 16, again
    assert theirs["usage"]["cached_tokens"] == 0, theirs


def test_queues_are_routed_apart(stack):
    """Each queue has its own exchange: a job's message reaches the inference queue only, and the
    maintenance worker (beat) never runs a job."""
    with stack.client() as client:
        for i in range(6):
            wait_final(client, submit(client, {"prompt": f"route {i}", "max_tokens": 2})["id"])
    bindings = {name: stack.redis.smembers(f"_kombu.binding.{name}") for name in ("inference", "maintenance")}
    assert bindings["inference"] and all(m.endswith("inference") for m in bindings["inference"])
    assert bindings["maintenance"] and all(m.endswith("maintenance") for m in bindings["maintenance"])
    assert "ponder.run_job[" not in stack.log("beat")
