"""A slot's admission of its pick into this worker's engine (ponder/workers/kv_reservations.py), and
the one exception to waiting for room: a batch line waiting for the batch's share of the engine
gives way to a direct job that becomes ready meanwhile, so that the slots kept for direct work take
it at once, not after the admission wait.

Every waiting slot of the process shares one look at the database per DIRECT_POLL_SECONDS (a
worker of 64 slots may have 8 of them waiting for a batch's room at any time)."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from functools import partial

from sqlmodel import Session

from ponder.service.db import sql_engine
from ponder.service.settings import Settings
from ponder.service.tables import utcnow
from ponder.workers.job_picker import Pick, direct_job_ready
from ponder.workers.kv_reservations import KvReservations
from ponder.workers.outages import patiently

REPICK = -1  # no reservation: a direct job became ready while a batch line waited for room
DIRECT_POLL_SECONDS = 0.02  # how often the waiting slots look for a direct job


class SharedCheck:
    """A check made at most once per `interval` for every thread that asks; the last answer in
    between. (Threads asking while one checks wait for its answer.)"""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._lock = threading.Lock()
        self._checked_at = -math.inf
        self._answer = False

    def __call__(self, check: Callable[[], bool]) -> bool:
        with self._lock:
            if time.monotonic() - self._checked_at >= self.interval:
                self._answer = check()
                self._checked_at = time.monotonic()
            return self._answer


_DIRECT_JOB_READY = SharedCheck(DIRECT_POLL_SECONDS)


def admit(pick: Pick, reservations: KvReservations, settings: Settings) -> int | None:
    """The pick's reservation, waiting up to the admission wait for room; None when there is none
    by then; REPICK when the pick is a batch line and a direct job became ready while it waited."""
    if not (pick.batch and settings.fair_scheduling):
        return reservations.admit_within(pick.demand, settings.admission_wait_seconds)
    deadline = time.monotonic() + settings.admission_wait_seconds
    look = partial(_direct_job_ready, settings)
    while True:
        wait = min(max(deadline - time.monotonic(), 0.0), DIRECT_POLL_SECONDS)
        reservation = reservations.admit_within(pick.demand, wait)
        if reservation is not None or time.monotonic() >= deadline:
            return reservation
        if patiently(lambda: _DIRECT_JOB_READY(look), settings, "looking for direct jobs"):
            return REPICK


def _direct_job_ready(settings: Settings) -> bool:
    with Session(sql_engine(settings, background=True)) as session:
        return direct_job_ready(session, utcnow())
