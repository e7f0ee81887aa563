"""The API fuzzed against its own OpenAPI schema (schemathesis): every operation, with a real API
key, on the real app (create_app and its lifespan, SQLite, the machine's Redis), with valid and
invalid requests. No request may answer 5xx, and every answer must match the schema: a 2xx its
route's model, every other status the error shape (ponder/service/errors.py:ErrorBody). A stateful run
follows the schema's links (a job created, then read, cancelled, streamed).

No worker runs: a job-creating route answers 202 as it would with one. The routes that wait for a
job's end (a chat completion, a response that is not `background`) get it from `cancel_queued`,
which cancels every queued job as a client would (ponder/service/job_rules.py:cancel_job).

The long run, against a uvicorn process: benchmarks/fuzz_api.py."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error, response_schema_conformance
from schemathesis.core.failures import Failure, FailureGroup
from sqlmodel import Session, col, select

from ponder.service import job_rules
from ponder.service.db import database_engine, upgrade
from ponder.service.errors import Conflict
from ponder.service.openai.chat import SAMPLER_FIELDS
from ponder.service.security import create_api_key
from ponder.service.settings import get_settings
from ponder.service.streams import JobSignals
from ponder.service.tables import ApiKey, Job, JobStatus
from tests.stack import start_redis

REDIS_DB = int(os.environ.get("PONDER_TEST_REDIS_DB", 13)) + 1
MAX_EXAMPLES = 40  # per operation: 35 operations x 40 cases, about a minute on two cores
STATEFUL_EXAMPLES = 60  # sequences of up to 6 linked calls
MODEL = "tiny-llama"


def not_a_server_error_but_not_ready(ctx, response, case):
    """not_a_server_error, except /readyz's documented 503: no inference worker runs here, and
    "not ready" is what it must say then."""
    if case.path == "/readyz" and response.status_code == 503:
        assert response.json()["checks"]["inference_workers"] == 0
        return None
    return not_a_server_error(ctx, response, case)


# The same cases on every run (`make test` is no place for a new random walk each time; the long,
# seeded run is benchmarks/fuzz_api.py); no time limit per case on a busy machine.
RUN = {"derandomize": True, "deadline": None, "suppress_health_check": list(HealthCheck), "database": None}
# A 2xx answers its route's model, any other status ErrorBody (ponder/service/errors.py:document_errors).
CHECKS = [not_a_server_error_but_not_ready, response_schema_conformance]


@pytest.fixture(scope="module")
def api(tmp_path_factory) -> Iterator[tuple[object, str]]:
    """(the app, an API key) on a fresh SQLite database and Redis database."""
    workdir = tmp_path_factory.mktemp("fuzz")
    redis_url, redis_process = start_redis(workdir, db=REDIS_DB)
    database_url = f"sqlite:///{workdir / 'ponder.db'}"
    upgrade(database_url)
    environment = {
        "PONDER_ENVIRONMENT": "test",
        "PONDER_DATABASE_URL": database_url,
        "PONDER_REDIS_URL": redis_url,
        "PONDER_MODEL": MODEL,
        "PONDER_FILES_DIR": str(workdir / "files"),
        "PONDER_DOCS_ENABLED": "true",
    }
    saved = {name: os.environ.get(name) for name in environment}
    os.environ.update(environment)
    get_settings.cache_clear()
    database_engine.cache_clear()
    try:
        from ponder.api.app import create_app

        with Session(database_engine(database_url)) as session:
            _, key = create_api_key(session, "fuzz")
        stop = threading.Event()
        canceller = threading.Thread(target=cancel_queued, args=(database_url, stop), daemon=True)
        canceller.start()
        yield create_app(), key
        stop.set()
        canceller.join(timeout=10)
    finally:
        from schemathesis.python import asgi

        asgi.shutdown_lifespans()  # the app's lifespan (its Redis client) ends with this module
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        get_settings.cache_clear()
        database_engine.cache_clear()
        if redis_process is not None:
            redis_process.kill()


def cancel_queued(database_url: str, stop: threading.Event) -> None:
    """Cancel each queued job as its owner would, until `stop`: stands in for the worker the
    waiting routes would otherwise wait on forever."""
    while not stop.wait(0.05):
        cancel_queued_now(database_url)


def cancel_queued_now(database_url: str) -> None:
    engine, settings = database_engine(database_url), get_settings()
    with Session(engine) as session:
        queued = session.exec(select(Job.id, Job.api_key_id).where(col(Job.status) == JobStatus.queued)).all()
        for job_id, key_id in queued:
            key = session.get(ApiKey, key_id)
            try:
                job_rules.cancel_job(session, key, job_id, JobSignals(settings.redis_url).publish_cancel, settings)
            except Conflict:  # it ended meanwhile: nothing to cancel
                session.rollback()


@pytest.fixture(scope="module")
def schema(api):
    app, key = api
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    schema.config.update(headers={"Authorization": f"Bearer {key}"})
    return schema


def plausible(case):
    """A valid case made likelier to pass the checks the schema cannot state (the served model, the
    only batch window, no tools or answer formats, whose combinations the schema cannot rule out,
    no sampler fields: the chat schema leaves their ranges to JobCreate, and the vocabulary and
    max_tokens bound logit_bias and min_tokens), so that jobs are created, listed, cancelled and waited on."""
    if isinstance(case.body, dict):
        for constraining in ("tools", "tool_choice", "response_format", "structured_outputs", "text", *SAMPLER_FIELDS):
            case.body.pop(constraining, None)
        if "model" in case.body:
            case.body["model"] = MODEL
        if case.path == "/v1/jobs" and not (case.body.get("messages") or case.body.get("prompt")):
            case.body["prompt"] = "What is 2 + 2?"
        if "completion_window" in case.body:
            case.body["completion_window"] = "24h"
        for message in case.body.get("messages") or []:
            if isinstance(message, dict):
                for unsupported in ("tool_calls", "function_call", "audio"):
                    message.pop(unsupported, None)
                message.setdefault("content", "hi")  # the schema cannot say it is required (but with tool_calls)
    return case


def test_no_operation_answers_a_server_error_or_off_schema(schema):
    """Each operation on its own (so one operation's failure does not hide another's): valid cases,
    valid cases made plausible, invalid cases; the failures of all are reported together."""
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 30  # every route of the app is in the schema
    statuses: dict[str, set[int]] = {}
    failures = {}
    for operation in operations:
        positive = operation.as_strategy(GenerationMode.POSITIVE)
        cases = st.one_of(positive, positive.map(plausible), operation.as_strategy(GenerationMode.NEGATIVE))

        @given(case=cases)
        @settings(max_examples=MAX_EXAMPLES, **RUN)
        def fuzz(case):
            response = case.call_and_validate(checks=CHECKS)
            statuses.setdefault(case.operation.label, set()).add(response.status_code)

        try:
            fuzz()
        except (Failure, FailureGroup, ExceptionGroup) as e:  # schemathesis' failures, each with its request
            failures[operation.label] = str(e)
    assert not failures, "\n\n".join(f"{label}:\n{failure}" for label, failure in failures.items())
    # the fuzzing went past validation: jobs were created, and waited on to their (cancelled) end
    assert 202 in statuses["POST /v1/jobs"] and 409 in statuses["POST /v1/chat/completions"], statuses


def test_linked_sequences_answer_no_server_error_or_off_schema(schema):
    """Stateful: sequences that follow the links schemathesis infers from the schema (a created
    job's id into GET, cancel, stream, deliveries; an uploaded file's id into a batch, ...)."""
    machine = schema.as_state_machine()
    answered: set[tuple[str, int]] = set()

    class Sequences(machine):  # type: ignore[valid-type, misc]
        def before_call(self, case):
            plausible(case)

        def after_call(self, response, case):
            # Every job a call queued is cancelled before the next call, not whenever the canceller
            # thread gets to it: a sequence's answers (a DELETE's 409 or 200) then replay alike,
            # which hypothesis' derandomized state machine needs.
            cancel_queued_now(get_settings().database_url)

        def validate_response(self, response, case, additional_checks=None, **kwargs):
            answered.add((case.operation.label, response.status_code))
            case.validate_response(response, checks=CHECKS, transport_kwargs=kwargs)

    Sequences.run(
        settings=settings(
            max_examples=STATEFUL_EXAMPLES,
            stateful_step_count=6,
            **RUN,
        )
    )
    # a created resource's id reached another operation through a link (a generated id names nothing)
    linked = {label for label, status in answered if status < 300 and "_id}" in label and "/v1/models/" not in label}
    assert linked, sorted(answered)
