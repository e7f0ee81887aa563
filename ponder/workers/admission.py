"""A slot's admission of its pick into this worker's engine (ponder/workers/kv_reservations.py), and
how the slots kept for direct work (beyond a batch's share) take a direct job at once: a batch line
waiting for the batch's share gives way to a direct job that becomes ready meanwhile (admit); and
a slot that ends a job while a batch runs, if it is one of those kept, waits for the next direct
job in the same task (next_direct_job).

A waiting slot learns of a direct job from its announcement (ponder/service/queue.py
DIRECT_JOB_CHANNEL, heard by one thread of the process: DirectJobBell), then looks at the database,
the truth; every LOOK_EVERY_SECONDS it looks anyway (an announcement lost with a Redis blip, a job
queued by a path that announces nothing). The process's waiting slots share one look per ring (a
worker of 64 slots may have 8 of them waiting for a batch's room at any time)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from functools import lru_cache, partial

import redis
from sqlmodel import Session

from ponder.service.db import sql_engine
from ponder.service.queue import DIRECT_JOB_CHANNEL
from ponder.service.settings import Settings
from ponder.service.tables import Job, utcnow
from ponder.workers.claim import claim_job
from ponder.workers.job_picker import Pick, direct_job_ready, pick_next_job
from ponder.workers.kv_reservations import KvReservations
from ponder.workers.outages import patiently

logger = logging.getLogger("ponder.worker")

REPICK = -1  # no reservation: a direct job became ready while a batch line waited for room
LOOK_EVERY_SECONDS = 0.25  # a waiting slot looks for a direct job this often without a ring


class DirectJobBell:
    """Counts the direct jobs announced at one Redis since it started listening and wakes the
    waiting admissions at each (a thread subscribed to DIRECT_JOB_CHANNEL)."""

    def __init__(self, redis_url: str) -> None:
        self.rings = 0
        self.subscribed = threading.Event()
        self._wakers: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._run, args=(redis_url,), name="direct-job-bell", daemon=True).start()

    def wake(self, waker: Callable[[], None]) -> None:
        """Call `waker` at each ring from now on."""
        with self._lock:
            if waker not in self._wakers:
                self._wakers.append(waker)

    def _run(self, redis_url: str) -> None:
        while True:
            try:
                client = redis.Redis.from_url(redis_url, socket_connect_timeout=2)
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(DIRECT_JOB_CHANNEL)
                self.subscribed.set()
                for _ in pubsub.listen():
                    self.rings += 1
                    for waker in list(self._wakers):
                        waker()
            except redis.RedisError as e:  # the slots still look every LOOK_EVERY_SECONDS
                self.subscribed.clear()
                logger.warning("not hearing direct jobs announced (%s); trying again in a second", e)
                time.sleep(1)


@lru_cache(maxsize=4)
def bell_for(redis_url: str) -> DirectJobBell:
    """The process's bell for the Redis at `redis_url`."""
    return DirectJobBell(redis_url)


class SharedLook:
    """One look for every thread asking about the same ring, or within `interval` of the last."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._lock = threading.Lock()
        self._looked: tuple[int, float, bool] = (-1, -float("inf"), False)  # ring, when, answer

    def __call__(self, ring: int, look: Callable[[], bool]) -> bool:
        with self._lock:
            looked_ring, looked_at, answer = self._looked
            if ring != looked_ring or time.monotonic() - looked_at >= self.interval:
                answer = look()
                self._looked = (ring, time.monotonic(), answer)
            return answer


_DIRECT_JOB_READY = SharedLook(LOOK_EVERY_SECONDS)


def admit(pick: Pick, reservations: KvReservations, settings: Settings) -> int | None:
    """The pick's reservation, waiting up to the admission wait for room; None when there is none
    by then; REPICK when the pick is a batch line and a direct job became ready while it waited."""
    if not (pick.batch and settings.fair_scheduling):
        return reservations.admit_within(pick.demand, settings.admission_wait_seconds)
    bell = bell_for(settings.redis_url)
    bell.wake(reservations.wake)
    deadline = time.monotonic() + settings.admission_wait_seconds
    look = partial(_direct_job_ready, settings)
    while True:
        ring = bell.rings
        wait = min(max(deadline - time.monotonic(), 0.0), LOOK_EVERY_SECONDS)
        reservation = reservations.admit_within(pick.demand, wait, until=partial(_rung_since, bell, ring))
        if reservation is not None or time.monotonic() >= deadline:
            return reservation
        if patiently(partial(_DIRECT_JOB_READY, bell.rings, look), settings, "looking for direct jobs"):
            return REPICK


def next_direct_job(worker: str, settings: Settings, reservations: KvReservations) -> tuple[Job, int] | None:
    """For a slot that has just ended a job, while a batch's lines run here: if it is one of the
    slots kept for direct jobs (KvReservations.start_keeping), the next direct job announced (or
    looked for) within the admission wait, claimed, with its reservation, in the same task. Back
    through Celery (its ack, then its next message) the slot came 10-30 ms after a job submitted
    when the last one ended, and that job waited for a slot between two of the batch's lines.
    A ring whose pick finds no direct job (another slot took it, or another database's job was
    announced: the channel is one per Redis) leaves it waiting for the next."""
    if not (settings.fair_scheduling and reservations.start_keeping()):
        return None
    try:
        for _ in _direct_job_moments(reservations, settings):
            if (taken := _take_direct_job(worker, settings, reservations)) is not None:
                return taken
        return None
    finally:
        reservations.stop_keeping()


def _direct_job_moments(reservations: KvReservations, settings: Settings) -> Iterator[None]:
    """Each moment, within the admission wait, a direct job may be ready: announced, or found by a
    look. Between two of them the slot waits for a ring or LOOK_EVERY_SECONDS, never spins."""
    bell = bell_for(settings.redis_url)
    bell.wake(reservations.wake)
    deadline = time.monotonic() + settings.admission_wait_seconds
    look = partial(_direct_job_ready, settings)
    ring = bell.rings
    if patiently(partial(_DIRECT_JOB_READY, ring, look), settings, "looking for direct jobs"):
        yield
    while (left := deadline - time.monotonic()) > 0:
        reservations.wait(min(left, LOOK_EVERY_SECONDS), until=partial(_rung_since, bell, ring))
        if _rung_since(bell, ring):  # announced after its commit: the pick is the look
            ring = bell.rings
            yield
        elif patiently(partial(_DIRECT_JOB_READY, ring, look), settings, "looking for direct jobs"):
            yield


def _take_direct_job(worker: str, settings: Settings, reservations: KvReservations) -> tuple[Job, int] | None:
    """The fair pick, if it is a direct job the engine holds now, claimed, with its reservation."""
    pick = patiently(partial(_direct_pick, settings), settings, "picking a job")
    reservation = reservations.try_admit(pick.demand) if pick is not None else None
    if pick is None or reservation is None:
        return None
    job = claim_admitted(pick, reservation, worker, settings, reservations)
    return (job, reservation) if job is not None else None


def claim_admitted(
    pick: Pick, reservation: int, worker: str, settings: Settings, reservations: KvReservations
) -> Job | None:
    """The pick claimed for its admission; None (the reservation given back) when another slot
    or worker claimed it first."""
    job = patiently(partial(claim_job, pick.job_id, worker, settings), settings, "claiming a job")
    if job is None:
        reservations.release(reservation)
    return job


def _direct_pick(settings: Settings) -> Pick | None:
    """The fair pick, if it is a direct job."""
    with Session(sql_engine(settings, background=True)) as session:
        pick = pick_next_job(session, utcnow())
    return pick if pick is not None and not pick.batch else None


def _rung_since(bell: DirectJobBell, ring: int) -> bool:
    return bell.rings != ring


def _direct_job_ready(settings: Settings) -> bool:
    with Session(sql_engine(settings, background=True)) as session:
        return direct_job_ready(session, utcnow())
