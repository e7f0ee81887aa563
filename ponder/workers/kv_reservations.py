"""What this worker's engine has promised to hold: a job is admitted only while the KV blocks it
reserves fit beside the other admitted jobs' and a sequence slot is free. A job that does not fit
stays queued in the database for a worker that has room, instead of waiting inside a full engine
marked `running`.

A reservation is the prompt plus a share of each sample's max tokens (`admission_output_share`):
reserving every max token would leave most of the cache idle (reasoning jobs ask for 32K and often
stop far earlier); reserving none would admit jobs the engine must then preempt. The engine's own
scheduler still preempts if admitted jobs outgrow the cache; admission only keeps the worker from
taking work it plainly cannot start.

A batch's lines hold at most `batch_share` of the slots (at least one) and of the blocks: the rest
is kept for direct jobs, so that a direct job starts at once instead of waiting for a batch line to
end (seconds to minutes for a reasoning line). Bookkeeping only: no torch, no engine calls."""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Demand:
    """What a job asks of an engine."""

    prompt_tokens: int
    max_tokens: int
    n: int = 1  # samples: the prompt's blocks are shared, each sample grows its own
    batch: bool = False  # a batch's line: held to the batch share

    def blocks(self, block_size: int, output_share: float) -> int:
        per_sample = math.ceil(self.max_tokens * output_share)
        return math.ceil((self.prompt_tokens + self.n * per_sample) / block_size)


class KvReservations:
    def __init__(
        self, num_blocks: int, block_size: int, max_seqs: int, output_share: float, batch_share: float = 1.0
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_seqs = max_seqs
        self.output_share = output_share
        self.batch_seqs = max(1, math.floor(max_seqs * batch_share))
        self.batch_blocks = math.floor(num_blocks * batch_share)
        self._reserved: dict[int, int] = {}  # reservation -> blocks
        self._batch: set[int] = set()  # the reservations of batch lines
        self._next = itertools.count(1)
        self._changed = threading.Condition()
        self._kept = 0  # slots waiting for a direct job (start_keeping)

    def try_admit(self, demand: Demand) -> int | None:
        """Reserve the demand's blocks if they fit now; returns the reservation (for release), or
        None. A job larger than the whole cache is admitted into an empty engine (nowhere would
        it fit better; the engine decides what it can do). Reservations are per taker, not per
        job: two slots that picked the same job each hold their own until they release it."""
        need = demand.blocks(self.block_size, self.output_share)
        with self._changed:
            used, taken = sum(self._reserved.values()), len(self._reserved)
            if taken >= self.max_seqs or (used + need > self.num_blocks and taken > 0):
                return None
            if demand.batch and not self._batch_room(need):
                return None
            reservation = next(self._next)
            self._reserved[reservation] = need
            if demand.batch:
                self._batch.add(reservation)
            return reservation

    def _batch_room(self, need: int) -> bool:
        """Whether a batch line's blocks fit in the batch share beside the other lines' (a line
        larger than the share is admitted when no other line holds any)."""
        used = sum(self._reserved[r] for r in self._batch)
        return len(self._batch) < self.batch_seqs and (used + need <= self.batch_blocks or not self._batch)

    def admit_within(self, demand: Demand, seconds: float, until: Callable[[], bool] | None = None) -> int | None:
        """try_admit, waiting up to `seconds` for admitted jobs to end (or, woken by `wake`, for
        `until` to hold)."""
        admitted: list[int] = []

        def admit() -> bool:
            reservation = self.try_admit(demand)
            if reservation is not None:
                admitted.append(reservation)
            return reservation is not None or (until is not None and until())

        with self._changed:
            self._changed.wait_for(admit, timeout=seconds)
        return admitted[0] if admitted else None

    def start_keeping(self) -> bool:
        """Take a place among the slots kept for direct jobs while a batch's lines run here (the
        slots beyond the batch share that run no direct job), if one is free: True."""
        with self._changed:
            direct = len(self._reserved) - len(self._batch)
            if not self._batch or self.max_seqs - self.batch_seqs - direct - self._kept <= 0:
                return False
            self._kept += 1
            return True

    def stop_keeping(self) -> None:
        with self._changed:
            self._kept -= 1

    def wait(self, seconds: float, until: Callable[[], bool]) -> None:
        """Wait up to `seconds` for `until` to hold (looked at again on each `wake` or release)."""
        with self._changed:
            self._changed.wait_for(until, timeout=seconds)

    def wake(self) -> None:
        """Wake the waiting admissions to look at their `until` again."""
        with self._changed:
            self._changed.notify_all()

    def release(self, reservation: int) -> None:
        with self._changed:
            self._batch.discard(reservation)
            if self._reserved.pop(reservation, None) is not None:
                self._changed.notify_all()

    def status(self) -> dict:
        with self._changed:
            return {
                "admitted": len(self._reserved),
                "reserved_blocks": sum(self._reserved.values()),
                "batch_lines": len(self._batch),
            }
