"""Running one job on this worker: claim it, hand it to the engine host, stream and persist what
comes back, write the result. Plain functions; the Celery task is a thin adapter around them.

The claim is one conditional UPDATE (queued -> running, or a running job whose lease expired), so
a duplicate delivery of a job whose lease is live changes nothing and is skipped.

Every write after the claim is fenced by it (`Claim`: the job still running, by this worker, in
this attempt): the row's UPDATEs carry it in their WHERE, the stream's appends check it in Redis
(ponder/workers/job_stream.py). A worker whose lease lapsed and whose job another worker claimed (a long GC
pause, a SIGSTOP, a network partition) changes nothing when it wakes: its first fenced write finds
it no longer owns the job, and it aborts its engine request and stops.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import uuid
from datetime import datetime, timedelta
from functools import partial

from sqlalchemy import or_
from sqlmodel import Session, col, select

from ponder.engine.outputs import RequestOutput, TokenLogprob
from ponder.engine.tool_calls import tool_call_format
from ponder.service import rate_limits
from ponder.service.db import durable, sql_engine
from ponder.service.logprobs import unpack
from ponder.service.queue import enqueue_deliveries, enqueue_job
from ponder.service.schemas import JobCreate
from ponder.service.settings import Settings
from ponder.service.tables import Job, JobStatus, utcnow
from ponder.service.webhooks.deliveries import EVENT_OF_STATUS, event_targets, record_final_event
from ponder.workers.admission import REPICK, admit, claim_admitted, next_direct_job
from ponder.workers.claim import Claim, LostClaim
from ponder.workers.engine_host import EngineHost
from ponder.workers.generated import GeneratedSoFar, record_output
from ponder.workers.job_picker import PICK_COLUMNS, Pick, lapsed, pick_next_job, ready
from ponder.workers.job_result import kept_logprobs, result_columns
from ponder.workers.job_stream import JobStream
from ponder.workers.kv_reservations import KvReservations
from ponder.workers.outages import patiently, until_redis_answers
from ponder.workers.vote import IsolatedClassifier, SampleVote
from ponder.workers.webhook_sender import hold_back

logger = logging.getLogger("ponder.worker")
PICK_ATTEMPTS = 10  # picks a message tries when other workers keep claiming the picked job first
RELEASED = "released"  # what _generate returns for a job it handed back (the worker drains)
# n > 1 jobs are voted in a child process: math-verify's timeouts need a main thread (ponder/workers/vote.py)
VOTE_CLASSIFIER = IsolatedClassifier()


def run_job(
    job_id: uuid.UUID,
    host: EngineHost,
    settings: Settings,
    worker: str,
    redis,
    draining: threading.Event | None = None,
    reservations: KvReservations | None = None,
) -> str:
    """Take a job for the slot this message stands for (take_job: the fair pick, if the engine can
    hold it) and run it; a re-run resumes from its checkpoint. When `draining` is set (the worker
    is stopping) the job is checkpointed and released to the queue at once. Returns what
    happened, for the logs."""
    if draining is not None and draining.is_set():  # a message that reached a stopping worker: pass it on
        enqueue_job(str(job_id))
        return "passed on: this worker is stopping"
    reservations = reservations or KvReservations(sys.maxsize, 1, sys.maxsize, 0.0)  # no engine limits given: admit all
    taken = take_job(job_id, worker, settings, reservations)
    if isinstance(taken, str):
        return taken
    job, reservation = taken
    try:
        outcome = f"job {job.id}: {_run_claimed(job, host, settings, worker, redis, draining)}"
    finally:
        reservations.release(reservation)
    if (draining is None or not draining.is_set()) and (kept := next_direct_job(worker, settings, reservations)):
        job, reservation = kept
        try:
            outcome += f"; then job {job.id}: {_run_claimed(job, host, settings, worker, redis, draining)}"
        finally:
            reservations.release(reservation)
    return outcome


def take_job(
    message_job_id: uuid.UUID, worker: str, settings: Settings, reservations: KvReservations
) -> tuple[Job, int] | str:
    """The job this message's slot runs, claimed, and its reservation in this worker's engine; or,
    as a string, why there is none. The message is never dropped while a job it could run waits:
    a job the engine cannot hold now (after waiting a moment for room) stays queued and the
    message goes back to the queue, for a worker with room; so does a message whose picks other
    workers kept claiming first."""
    batch = False
    for _ in range(PICK_ATTEMPTS):
        pick = patiently(partial(_next_pick, message_job_id, settings), settings, "picking a job")
        if pick is None:
            return "skipped: no job to take (the message's job is running elsewhere, finished, cancelled or expired)"
        reservation = admit(pick, reservations, settings)
        if reservation == REPICK:
            continue
        if reservation is None:
            enqueue_job(str(message_job_id), batch=pick.batch)
            return f"passed on: the engine cannot hold job {pick.job_id} now"
        if (job := claim_admitted(pick, reservation, worker, settings, reservations)) is not None:
            return job, reservation
        batch = pick.batch  # another worker claimed it first: pick again
    enqueue_job(str(message_job_id), batch=batch)
    return "passed on: other workers claimed every job picked"


def _next_pick(message_job_id: uuid.UUID, settings: Settings) -> Pick | None:
    """The message's own job when its worker was lost (its lease lapsed: recover it first) or when
    fair scheduling is off; else the fair pick among the queued jobs (ponder/workers/job_picker.py)."""
    now = utcnow()
    own = lapsed(now) if settings.fair_scheduling else or_(lapsed(now), ready(now))
    with Session(sql_engine(settings, background=True)) as session:
        row = session.exec(select(*PICK_COLUMNS).where(col(Job.id) == message_job_id, own)).first()
        if row is not None:
            return Pick.of_row(*row)
        return pick_next_job(session, now, message_job_id) if settings.fair_scheduling else None


def _run_claimed(job: Job, host: EngineHost, settings: Settings, worker: str, redis, draining) -> str:
    claim = Claim(job.id, worker, job.attempts)
    stream = JobStream(redis, claim)
    # One engine request per attempt: a worker handed a job it still runs (its lease lapsed while
    # Redis was away, and beat requeued it) runs the new attempt; the old one stops at its next
    # fenced write. The same id twice would be refused by the engine and fail the job.
    request_id = f"{job.id}#{job.attempts}"
    tool_format = tool_call_format(host.engine.tokenizer.chat_template)
    params = JobCreate.from_stored(job.request).sampling_params(job.request["max_tokens"], tool_format)
    resume, restart_reason = usable_checkpoint(job, settings, host.engine.model_config.vocab_size)
    resume_logprobs = checkpoint_logprobs(job, resume) if params.logprobs is not None else None
    generated = (
        GeneratedSoFar.resumed(job, resume, resume_logprobs, params) if resume else GeneratedSoFar.started(params)
    )
    generated.vote = SampleVote.for_request(job.request, lambda i: host.abort_sample(request_id, i), VOTE_CLASSIFIER)
    ended = False
    try:
        wasted_tokens = until_redis_answers(lambda: _take_stream(stream, job, resume, settings), settings)
        if job.attempts > 1 or wasted_tokens:  # a first attempt's row already says it starts from nothing
            start = partial(_record_start, claim, len(resume or []), restart_reason, wasted_tokens, settings)
            patiently(start, settings, "recording the attempt")
        salt = None if settings.share_prefix_cache else str(job.api_key_id)  # tenants share no cached prefix
        handle = host.submit(request_id, job.prompt_token_ids, params, str(job.id), resume, salt, resume_logprobs)
        status = _generate(job, claim, handle, host, stream, generated, settings, draining or threading.Event())
        ended = status != RELEASED
    except LostClaim as e:
        return f"stopped: lost its claim on the job ({e})"
    finally:  # whatever else ends this (a lost claim, a Redis or database error), the engine stops too
        if not ended:
            host.abort(request_id)  # (unknown or finished ids are ignored by the host)
    if status == RELEASED:
        return "released: checkpointed and requeued (the worker is stopping)"
    stream.end(settings.stream_ttl_seconds)
    return status


def usable_checkpoint(job: Job, settings: Settings, vocab_size: int) -> tuple[list[int] | None, str | None]:
    """The output token ids a re-run resumes from, or None and why not (None, None: nothing to resume)."""
    checkpoint = job.checkpoint or {}
    token_ids = checkpoint.get("token_ids") or []
    if job.attempts < 2 or not token_ids:
        return None, None
    if job.request.get("n", 1) > 1:
        return None, "a job with n > 1 starts over: its checkpoint holds sample 0 alone"
    if not settings.resume_from_checkpoint:
        return None, "resuming from checkpoints is turned off (PONDER_RESUME_FROM_CHECKPOINT)"
    model = settings.model
    if checkpoint.get("model") != model:
        return None, f"its checkpoint was written by model {checkpoint.get('model')!r}; this worker serves {model!r}"
    valid = all(isinstance(t, int) and 0 <= t < vocab_size for t in token_ids)
    if not valid or len(token_ids) > job.request["max_tokens"]:
        return None, "its checkpoint's token ids are not valid for this model and request"
    return token_ids, None


def checkpoint_logprobs(job: Job, resume: list[int] | None) -> list[TokenLogprob] | None:
    """The values the checkpoint keeps for the tokens a re-run resumes from (None: the engine
    computes them again; a checkpoint of an older version, or of another request, has none)."""
    packed = (job.checkpoint or {}).get("logprobs")
    values = unpack(packed) if resume and packed else None
    return values if values is not None and len(values) == len(resume or []) else None


def _take_stream(stream: JobStream, job: Job, resume: list[int] | None, settings: Settings) -> int:
    """A first attempt takes the stream as it is; a resumed one drops what came after its
    checkpoint; any other re-run starts it over. Returns the generated tokens thrown away."""
    ttl = settings.job_ttl_seconds + settings.stream_ttl_seconds
    if resume:
        keep = {"reasoning": len(job.reasoning_content or ""), "content": len(job.content or "")}
        return stream.take(ttl, "resume", (job.checkpoint or {}).get("stream_id"), keep, len(resume))
    return stream.take(ttl, "restart" if job.attempts > 1 else "")


def _record_start(
    claim: Claim, resumed_tokens: int, restart_reason: str | None, wasted_tokens: int, settings: Settings
) -> None:
    """What this attempt starts from, and what the attempts before it generated in vain, in the
    row (under the claim)."""
    with Session(sql_engine(settings, background=True)) as session:
        claim.write(
            session,
            resumed_tokens=resumed_tokens,
            restart_reason=restart_reason,
            wasted_tokens=Job.wasted_tokens + wasted_tokens,
        )
        session.commit()


def _generate(
    job: Job,
    claim: Claim,
    handle,
    host: EngineHost,
    stream: JobStream,
    generated: GeneratedSoFar,
    settings: Settings,
    draining: threading.Event,
) -> str:
    """Follow the engine's outputs to the end: stream them, flush progress, write the result (or
    release the job, checkpointed, when the worker drains)."""
    next_flush = time.monotonic() + settings.progress_interval_seconds
    while generated.final is None:
        if draining.is_set():
            stream.flush()
            patiently(partial(_release, claim, generated, settings, stream.last_id), settings, "releasing the job")
            return RELEASED
        entries: list[tuple[str, str, int, int]] = []
        for event in handle.get_all(timeout=0.25):
            if event.error is not None:
                stream.append(*entries)
                stream.flush()
                used_tokens = job.prompt_tokens + generated.completion_tokens
                fail = partial(_fail, claim, f"{type(event.error).__name__}: {event.error}", settings, used_tokens)
                patiently(fail, settings, "recording the failure")
                return "failed"
            assert event.output is not None  # only an error event comes without an output (EngineHost)
            entries += record_output(generated, event.output, event.batch_size)
        stream.append(*entries)
        if time.monotonic() >= next_flush and generated.final is None:
            stream.flush()  # the checkpoint names the last entry written: what it covers is in the stream
            flush = partial(_flush_progress, claim, generated, settings, stream.last_id)
            if patiently(flush, settings, "flushing progress"):  # True: cancel asked or deadline passed
                host.abort(handle.request_id)
            next_flush = time.monotonic() + settings.progress_interval_seconds
    return patiently(partial(_finish, job, claim, generated, settings), settings, "writing the result")


def _flush_progress(claim: Claim, generated: GeneratedSoFar, settings: Settings, stream_id: str | None = None) -> bool:
    """Persist partial output and the checkpoint (its token ids, and the stream entry its text
    reaches), and renew the lease; returns True when the job must stop now (a LostClaim when the
    job is no longer this attempt's)."""
    now = utcnow()
    lease = now + timedelta(seconds=settings.lease_seconds)
    with Session(sql_engine(settings, background=True)) as session:
        progress = _progress(generated, settings, stream_id)
        cancel_requested, expires_at = claim.write(session, **progress, lease_expires_at=lease, updated_at=now)
        session.commit()
    return cancel_requested or expires_at <= now


def _release(claim: Claim, generated: GeneratedSoFar, settings: Settings, stream_id: str | None) -> None:
    """Back to the queue with a checkpoint of everything generated so far, and its message sent at
    once: another worker resumes it in seconds, not after the lease. Under the claim."""
    with Session(sql_engine(settings, background=True)) as session:
        progress = _progress(generated, settings, stream_id)
        claim.write(
            session, status=JobStatus.queued, worker=None, lease_expires_at=None, updated_at=utcnow(), **progress
        )
        session.commit()
    enqueue_job(str(claim.job_id))


def _progress(generated: GeneratedSoFar, settings: Settings, stream_id: str | None) -> dict:
    """The row's columns a progress flush (and a release) writes: text so far and the checkpoint."""
    return {
        "content": "".join(generated.content),
        "reasoning_content": "".join(generated.reasoning),
        "checkpoint": {
            "model": settings.model,
            "token_ids": generated.token_ids,
            "stream_id": stream_id,
            **({"logprobs": generated.logprobs.packed()} if generated.logprobs is not None else {}),
        },
        "completion_tokens": generated.completion_tokens,
        "max_batch_size": generated.max_batch_size,
        "first_token_at": generated.first_token_at,
    }


def _finish(job: Job, claim: Claim, generated: GeneratedSoFar, settings: Settings) -> str:
    """Write the result and its webhook deliveries in one transaction, under the claim (the result
    alone in one statement when nobody listens: Claim.write_alone); send them after it. A LostClaim
    (and nothing written) when the job is no longer this attempt's."""
    output = generated.final
    assert output is not None  # run_job finishes a job only once its last output came
    now = utcnow()
    # n > 1: the vote's answer is the job's; sample 0 stopped by the vote ended `abort`, yet the job succeeded
    voted = generated.vote.record(output) if generated.vote is not None else {}
    stopped_by_vote = generated.vote is not None and 0 in generated.vote.stopped
    engine = sql_engine(settings, background=True)
    with Session(engine) as session:
        status = JobStatus.succeeded if stopped_by_vote else _final_status(session, job, output, now)
        targets = event_targets(session, job.api_key_id, job.webhook_url, EVENT_OF_STATUS[status])  # before writing
    targets = hold_back(targets, job.api_key_id, settings) if targets else targets
    result = result_columns(output, voted, status, now, generated.first_token_at, generated.max_batch_size)
    result |= kept_logprobs(output, generated.params)
    deliveries = []
    if not targets:  # nobody listens: the result is the one write
        claim.write_alone(engine, **result)
    else:
        with Session(engine) as session:
            durable(session)  # the result is reported (webhooks, settled limits): a crash must not undo it
            claim.write(session, **result)
            deliveries = record_final_event(session, job.id, settings, targets)
            session.commit()
    enqueue_deliveries(deliveries)
    # after the fenced commit: only the attempt that ended the job settles its key's token counts
    rate_limits.settle(job.id, job.prompt_tokens + output.usage.completion_tokens, settings)
    return str(status)


def _final_status(session: Session, job: Job, output: RequestOutput, now: datetime) -> JobStatus:
    """succeeded; or, stopped (an abort), expired when the row's deadline has passed (read now: the
    deadline may have moved since the claim, as a batch's window does) and cancelled otherwise."""
    if output.finish_reason != "abort":
        return JobStatus.succeeded
    expires_at = session.exec(select(Job.expires_at).where(col(Job.id) == job.id)).first() or job.expires_at
    return JobStatus.expired if expires_at <= now else JobStatus.cancelled


def _fail(claim: Claim, error: str, settings: Settings, used_tokens: int = 0) -> None:
    """Mark the job failed under the claim (a LostClaim, nothing written, when it is not ours);
    its key's rate limits count `used_tokens` for it."""
    now = utcnow()
    with Session(sql_engine(settings, background=True)) as session:
        durable(session)
        claim.write(
            session, status=JobStatus.failed, error=error, finished_at=now, lease_expires_at=None, updated_at=now
        )
        deliveries = record_final_event(session, claim.job_id, settings)
        session.commit()
    enqueue_deliveries(deliveries)
    rate_limits.settle(claim.job_id, used_tokens, settings)
