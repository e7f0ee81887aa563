"""At most PONDER_WEBHOOK_MAX_IN_FLIGHT_PER_RECEIVER attempts to one receiver, and at most
PONDER_WEBHOOK_MAX_IN_FLIGHT_PER_KEY attempts of one API key's deliveries, at a time, across every
webhooks worker: a receiver that answers slowly (or never) holds that many worker threads, and a key
with many such receivers no more than its share, never all PONDER_WEBHOOK_CONCURRENCY of them: the
other tenants' deliveries go on.

A receiver is its URL's scheme, host and port (every path of one host is one server's threads). Each
receiver's and each key's slots are a Redis sorted set of the deliveries in flight, each scored with
when its hold ends (the attempt's lease): a worker that dies holding one frees it when the lease
would have lapsed. An attempt takes both at once, or neither. Redis away: the attempt goes ahead
(the limit fails open, as the rate limits do)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import TypeVar
from urllib.parse import urlsplit

from redis import exceptions as redis_errors

from ponder.service.rate_limits import sync_redis
from ponder.service.webhooks.deliveries import Targets

logger = logging.getLogger("ponder.webhooks")

SLOTS_PREFIX = "ponder:receiver-slots:"
KEY_SLOTS_PREFIX = "ponder:key-webhook-slots:"
T = TypeVar("T")

# KEYS: the slot sets; ARGV: hold (ms), delivery id, then each set's slots. 1: taken in every set
# (or held already), 0: one of them is full and nothing was taken.
_TAKE = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local hold, delivery = tonumber(ARGV[1]), ARGV[2]
for i, set in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', set, '-inf', now)
  if not redis.call('ZSCORE', set, delivery) and redis.call('ZCARD', set) >= tonumber(ARGV[i + 2]) then
    return 0
  end
end
for _, set in ipairs(KEYS) do
  redis.call('ZADD', set, now + hold, delivery)
  redis.call('PEXPIRE', set, hold)
end
return 1
"""


# KEYS: the slot sets; ARGV: each set's slots. Each set's free slots, lapsed holds dropped first.
_FREE = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local free = {}
for i, set in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', set, '-inf', now)
  free[i] = tonumber(ARGV[i]) - redis.call('ZCARD', set)
end
return free
"""


def receiver_of(url: str) -> str:
    """`scheme://host:port` of a webhook URL."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.scheme}://{(parts.hostname or '').lower()}:{port}"


class ReceiverSlots:
    def __init__(self, redis_url: str, per_receiver: int, per_key: int, hold_seconds: float) -> None:
        self.redis_url, self.hold_ms = redis_url, int(hold_seconds * 1000)
        self.per_receiver, self.per_key = per_receiver, per_key

    def take(self, url: str, key_id: uuid.UUID, delivery_id: str) -> bool:
        """A slot of the URL's receiver and one of the key's for this delivery's attempt, or False
        when either has none free."""
        sets = self._sets(url, key_id)
        try:
            script = sync_redis(self.redis_url).register_script(_TAKE)
            taken = script(keys=list(sets), args=[self.hold_ms, delivery_id, *sets.values()])
        except redis_errors.RedisError as e:
            logger.warning("receiver slots not enforced: Redis error (%s)", e)
            return True
        return bool(taken)

    def allot(self, due: list[tuple[T, str, uuid.UUID]]) -> tuple[list[T], list[T]]:
        """Split due deliveries `(id, url, key id)`, in order, into those with a slot free for them
        now (of their receiver and of their key, each slot counted once) and those to hold back.
        Nothing is taken: the attempt takes its slots itself. Redis away: none is held back."""
        free = self._free({name: slots for _, url, key_id in due for name, slots in self._sets(url, key_id).items()})
        if free is None:
            return [delivery_id for delivery_id, _, _ in due], []
        send: list[T] = []
        held: list[T] = []
        for delivery_id, url, key_id in due:
            sets = self._sets(url, key_id)
            if all(free[s] > 0 for s in sets):
                send.append(delivery_id)
                for s in sets:
                    free[s] -= 1
            else:
                held.append(delivery_id)
        return send, held

    def hold_back(self, targets: Targets, key_id: uuid.UUID, until: Callable[[], datetime]) -> Targets:
        """An event's targets, about to be recorded, with those that have no slot free now held back
        until `until()`: the sweep sends them then. A key's crowd of events to slow receivers costs
        a row each, not a task each that would only postpone its delivery."""
        _, held = self.allot([(i, target.url, key_id) for i, target in enumerate(targets)])
        return [target._replace(held_until=until()) if i in held else target for i, target in enumerate(targets)]

    def _sets(self, url: str, key_id: uuid.UUID) -> dict[str, int]:
        """The slot sets an attempt of this delivery takes, its receiver's and its key's, with each one's slots."""
        return {SLOTS_PREFIX + receiver_of(url): self.per_receiver, f"{KEY_SLOTS_PREFIX}{key_id}": self.per_key}

    def _free(self, sets: dict[str, int]) -> dict[str, int] | None:
        """Each set's free slots now; None when Redis cannot say."""
        names = list(sets)
        try:
            script = sync_redis(self.redis_url).register_script(_FREE)
            free = script(keys=names, args=list(sets.values())) if names else []
        except redis_errors.RedisError as e:
            logger.warning("receiver slots not counted: Redis error (%s)", e)
            return None
        return dict(zip(names, free, strict=True))

    def give_back(self, url: str, key_id: uuid.UUID, delivery_id: str) -> None:
        try:
            client = sync_redis(self.redis_url)
            for name in self._sets(url, key_id):
                client.zrem(name, delivery_id)
        except redis_errors.RedisError as e:  # the hold ends with its lease anyway
            logger.warning("receiver slot of %s kept until its lease ends: Redis error (%s)", delivery_id, e)
