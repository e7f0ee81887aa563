"""At most PONDER_WEBHOOK_MAX_IN_FLIGHT_PER_RECEIVER attempts to one receiver at a time, across every
webhooks worker: a receiver that answers slowly (or never) holds that many worker threads, never all
PONDER_WEBHOOK_CONCURRENCY of them, and the other tenants' deliveries go on.

A receiver is its URL's scheme, host and port (every path of one host is one server's threads). Its
slots are a Redis sorted set of the deliveries in flight, each scored with when its hold ends (the
attempt's lease): a worker that dies holding one frees it when the lease would have lapsed. Redis
away: the attempt goes ahead (the limit fails open, as the rate limits do)."""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

from redis import exceptions as redis_errors

from ponder.service.rate_limits import sync_redis

logger = logging.getLogger("ponder.webhooks")

SLOTS_PREFIX = "ponder:receiver-slots:"

# KEYS[1]: the receiver's slots; ARGV: slots, hold (ms), delivery id. 1: taken (or held already).
_TAKE = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[3]) and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
"""


def receiver_of(url: str) -> str:
    """`scheme://host:port` of a webhook URL."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.scheme}://{(parts.hostname or '').lower()}:{port}"


class ReceiverSlots:
    def __init__(self, redis_url: str, per_receiver: int, hold_seconds: float) -> None:
        self.redis_url, self.per_receiver, self.hold_ms = redis_url, per_receiver, int(hold_seconds * 1000)

    def take(self, url: str, delivery_id: str) -> bool:
        """A slot of the URL's receiver for this delivery's attempt, or False when all are taken."""
        try:
            taken = sync_redis(self.redis_url).register_script(_TAKE)(
                keys=[SLOTS_PREFIX + receiver_of(url)], args=[self.per_receiver, self.hold_ms, delivery_id]
            )
        except redis_errors.RedisError as e:
            logger.warning("receiver slots not enforced: Redis error (%s)", e)
            return True
        return bool(taken)

    def give_back(self, url: str, delivery_id: str) -> None:
        try:
            sync_redis(self.redis_url).zrem(SLOTS_PREFIX + receiver_of(url), delivery_id)
        except redis_errors.RedisError as e:  # the hold ends with its lease anyway
            logger.warning("receiver slot of %s kept until its lease ends: Redis error (%s)", delivery_id, e)
