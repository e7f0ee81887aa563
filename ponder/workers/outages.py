"""A job's attempt waits out an outage of Redis or of the database instead of ending: a restart
takes seconds, a crash's recovery a few. Half the lease is the patience (the claim's lease was
renewed at the last write): past it the error goes up, the attempt ends and the lease lapses."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from redis import exceptions as redis_errors

from ponder.service.db import until_database_answers
from ponder.service.settings import Settings

logger = logging.getLogger("ponder.worker")
T = TypeVar("T")


def patiently(action: Callable[[], T], settings: Settings, what: str) -> T:
    """A write of a job's attempt (or a maintenance task), run again while the database is away for
    up to half the lease: the attempt goes on with its claim instead of ending (its engine request
    keeps generating meanwhile); past that the error goes up and the lease lapses."""
    return until_database_answers(action, settings.lease_seconds / 2, what)


def until_redis_answers(action, settings: Settings):
    """`action()`, retried while Redis is unreachable (restarting from its AOF takes seconds) for
    up to half the lease the claim just took; then the error goes up and the lease lapses."""
    deadline = time.monotonic() + settings.lease_seconds / 2
    while True:
        try:
            return action()
        except redis_errors.ConnectionError:
            if time.monotonic() >= deadline:
                raise
            logger.warning("Redis unreachable while taking a job's stream; retrying")
            time.sleep(0.5)
