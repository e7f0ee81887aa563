"""Rate limits and quotas per API key, counted in Redis so that every API process shares them.

A key's limits (its ApiKey columns, else the PONDER_RATE_LIMIT_* defaults; 0 = unlimited):
requests per minute, tokens per minute, tokens per day, and jobs queued or running at once (counted
in samples: a job of n samples takes n of the places, as it takes n of an engine's slots).

- **Requests** are counted on every route that makes work (`/v1/jobs`, `/v1/chat/completions`, `/v1/completions`,
  `/v1/responses`, `/v1/batches`, a delivery's `redeliver`) before anything else is done
  (`RateLimitCharge.count_request`, from the route dependency ponder/api/deps.py `rate_limited`).
- **Tokens and jobs** are admitted by `RateLimitCharge.reserve` inside `ponder/service/job_rules.py:create_job`,
  once the prompt is tokenized: prompt tokens + n x max tokens are counted in the current minute and
  day, and the job joins the key's set of live jobs with its n, all in one script. When the job ends, the
  worker's final write (ponder/workers/job_runner.py) `settle`s: the counts move to the tokens really used
  and the job leaves the set. The reservation is one Redis hash per job that `settle` deletes in
  the same script, so a second settle (a retried task, a duplicate message) changes nothing; only
  the attempt whose fenced final write committed settles at all. A queued job cancelled through
  the API settles to 0 (ponder/service/job_rules.py cancel_job).
- Windows are fixed (`floor(now / window)`) on Redis' clock (`TIME`), so API processes whose clocks
  differ agree. A "minute" and a "day" are PONDER_RATE_LIMIT_WINDOW_SECONDS and
  PONDER_RATE_LIMIT_DAY_SECONDS long (60 s and 86400 s; tests shorten them).
- Over a limit: 429 `rate_limit_error`, `Retry-After` (whole seconds) and `retry-after-ms` until
  the window that refused rolls over (OpenAI's SDKs wait that long before their own retry), and
  OpenAI's `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` on every admission answer of a
  limited key (`RateLimitHeaders` puts them on the response, whichever way it ends).
- Jobs that beat ends (a queued job expired, a job out of attempts) are not settled: their tokens
  stay counted as reserved until the window rolls, and they leave the live set when an admission
  finds the set full and prunes it against the database (`_prune`).
- Redis unreachable: the request is admitted, with a logged warning (fail open: an outage of the
  counters must not turn every submission into an error).

Own Lua scripts (redis-py `register_script`), not the `limits` library: its strategies count
hits one key at a time and cannot take back part of a hit, while admission here checks three
counters and a set in one atomic step and settling moves a count down to real usage. The scripts
build their keys' names from a prefix (the windows' names depend on Redis' clock): a single Redis
server, as Celery's broker here is, not Redis Cluster.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from functools import lru_cache

import redis
from redis import exceptions as redis_errors
from sqlmodel import Session, col, select

from ponder.service.errors import LimitExceeded
from ponder.service.settings import Settings
from ponder.service.tables import ApiKey, Job, JobStatus

logger = logging.getLogger("ponder.api")

PREFIX = "ponder:rl:"
# Admitted jobs missing from the database this long are dropped from the live set (an API
# process died between its admission and its commit).
UNCOMMITTED_GRACE_MS = 60_000
# A full live set frees a place when one of its jobs ends, which no window says: try again soon.
CONCURRENCY_RETRY_MS = 1000

# ARGV: counter prefix, limit, window (ms). {admitted (1/0), count, ms until the window rolls}
_REQUEST = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local window = tonumber(ARGV[3])
local index = math.floor(now / window)
local key = ARGV[1] .. index
local reset = (index + 1) * window - now
local count = tonumber(redis.call('GET', key) or '0')
if count >= tonumber(ARGV[2]) then return {0, count, reset} end
count = redis.call('INCR', key)
redis.call('PEXPIRE', key, reset + 1000)
return {1, count, reset}
"""

# ARGV: key prefix, job id, tokens, tokens/minute limit, tokens/day limit, minute (ms), day (ms),
# max live samples, reservation TTL (ms), the job's samples (n). Returns {refused (0: admitted, 1:
# minute tokens, 2: day tokens, 3: live samples), minute used, minute reset ms, day used, day reset
# ms, live samples}, the counts before this job. The live jobs are a sorted set (score: admitted
# at) beside a hash of their samples (a member missing from it counts one).
_ADMIT = (
    """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local prefix, job, tokens = ARGV[1], ARGV[2], tonumber(ARGV[3])
local windows = {{tonumber(ARGV[4]), tonumber(ARGV[6]), 'tpm:'}, {tonumber(ARGV[5]), tonumber(ARGV[7]), 'tpd:'}}
local keys, used, resets = {}, {}, {}
local refused = 0
for i, w in ipairs(windows) do
  local index = math.floor(now / w[2])
  keys[i] = prefix .. w[3] .. index
  used[i] = tonumber(redis.call('GET', keys[i]) or '0')
  resets[i] = (index + 1) * w[2] - now
  if refused == 0 and w[1] > 0 and used[i] + tokens > w[1] then refused = i end
end
local max_samples, samples = tonumber(ARGV[8]), tonumber(ARGV[10])
local live = 0
if max_samples > 0 then
  for _, member in ipairs(redis.call('ZRANGE', prefix .. 'jobs', 0, -1)) do
    live = live + (tonumber(redis.call('HGET', prefix .. 'samples', member)) or 1)
  end
end
if refused == 0 and max_samples > 0 and live + samples > max_samples then refused = 3 end
local answer = {refused, used[1], resets[1], used[2], resets[2], live}
if refused > 0 then return answer end
for i = 1, 2 do
  redis.call('INCRBY', keys[i], tokens)
  redis.call('PEXPIRE', keys[i], resets[i] + 1000)
end
local reservation = {'tokens', tokens, 'tpm', keys[1], 'tpd', keys[2]}
if max_samples > 0 then
  redis.call('ZADD', prefix .. 'jobs', now, job)
  redis.call('HSET', prefix .. 'samples', job, samples)
  table.insert(reservation, 'jobs')
  table.insert(reservation, prefix .. 'jobs')
end
local hash = '"""
    + PREFIX
    + """job:' .. job
redis.call('HSET', hash, unpack(reservation))
redis.call('PEXPIRE', hash, tonumber(ARGV[9]))
return answer
"""
)

# KEYS[1]: the job's reservation; ARGV: tokens used, job id. 1: settled, 0: nothing to settle.
_SETTLE = """
local r = redis.call('HMGET', KEYS[1], 'tokens', 'tpm', 'tpd', 'jobs')
if not r[1] then return 0 end
redis.call('DEL', KEYS[1])
local delta = tonumber(ARGV[1]) - tonumber(r[1])
for i = 2, 3 do
  if redis.call('EXISTS', r[i]) == 1 then redis.call('INCRBY', r[i], delta) end
end
if r[4] then
  redis.call('ZREM', r[4], ARGV[2])
  redis.call('HDEL', string.sub(r[4], 1, -5) .. 'samples', ARGV[2])
end
return 1
"""


@dataclass(frozen=True)
class Limits:
    """A key's limits in force: its own, else the deployment's defaults. 0 = unlimited."""

    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    tokens_per_day: int = 0
    max_concurrent_jobs: int = 0

    @classmethod
    def of(cls, key: ApiKey, settings: Settings) -> Limits:
        def pick(own: int | None, default: int) -> int:
            return default if own is None else own

        return cls(
            pick(key.requests_per_minute, settings.rate_limit_requests_per_minute),
            pick(key.tokens_per_minute, settings.rate_limit_tokens_per_minute),
            pick(key.tokens_per_day, settings.rate_limit_tokens_per_day),
            pick(key.max_concurrent_jobs, settings.rate_limit_max_concurrent_jobs),
        )

    @property
    def limits_tokens(self) -> bool:
        return bool(self.tokens_per_minute or self.tokens_per_day or self.max_concurrent_jobs)


@dataclass
class RateLimitCharge:
    """One request's rate-limit state: what `count_request` found, the headers answered so far
    (RateLimitHeaders adds them to the response), and `reserve` for the job it makes."""

    key_id: uuid.UUID
    limits: Limits
    settings: Settings
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def prefix(self) -> str:
        return f"{PREFIX}{self.key_id}:"

    @classmethod
    def of(cls, key: ApiKey, settings: Settings) -> RateLimitCharge:
        return cls(key.id, Limits.of(key, settings), settings)

    async def count_request(self, redis_client) -> None:
        """Count one request against the key's requests per minute (a 429 when over). Every
        job-creating route calls this first (ponder/api/deps.py RateLimited)."""
        limit = self.limits.requests_per_minute
        if not limit:
            return
        args = [self.prefix + "rpm:", limit, _ms(self.settings.rate_limit_window_seconds)]
        try:
            admitted, count, reset = [int(v) for v in await redis_client.register_script(_REQUEST)(args=args)]
        except redis_errors.RedisError as e:
            _fail_open(e)
            return
        self.headers |= _trio("requests", limit, limit - count, reset)
        if not admitted:
            raise rate_limited(f"requests per minute limit reached: {limit}", reset)

    def reserve(self, session: Session, job_id: uuid.UUID, tokens: int, samples: int = 1) -> None:
        """Count the job's tokens (prompt + n x max tokens) and take `samples` (its n) places among
        the key's live samples, or raise a 429. Redis unreachable: admitted (fail open, logged)."""
        if not self.limits.limits_tokens:
            return
        limit = self.limits.max_concurrent_jobs
        if limit and samples > limit:  # never admissible: waiting does not help
            message = f"this request runs {samples} samples (n), more than the {limit} this key may run at once"
            raise LimitExceeded(message, code="request_too_large", headers={"x-should-retry": "false"})
        try:
            answer = self._admit(job_id, tokens, samples)
            if answer[0] == 3 and _prune(sync_redis(self.settings.redis_url), session, self.prefix):
                answer = self._admit(job_id, tokens, samples)  # the set held jobs that had ended
        except redis_errors.RedisError as e:
            _fail_open(e)
            return
        refused, minute_used, minute_reset, day_used, day_reset, live = answer
        self._token_headers(tokens if not refused else 0, minute_used, minute_reset, day_used, day_reset)
        if refused == 3:
            message = (
                f"too many jobs at once: {live} queued or running and {samples} more asked for, "
                f"the limit is {limit} (a job counts as its n samples)"
            )
            raise rate_limited(message, CONCURRENCY_RETRY_MS)
        if refused:
            limit, used, reset, name = (
                (self.limits.tokens_per_minute, minute_used, minute_reset, "tokens per minute")
                if refused == 1
                else (self.limits.tokens_per_day, day_used, day_reset, "tokens per day")
            )
            if tokens > limit:  # never admissible: waiting does not help
                message = (
                    f"this request needs {tokens} tokens (prompt + max tokens), more than the {name} limit of {limit}"
                )
                raise LimitExceeded(message, code="request_too_large", headers={"x-should-retry": "false"})
            raise rate_limited(f"{name} limit reached: {used} of {limit} used, this request needs {tokens}", reset)

    def release(self, job_id: uuid.UUID) -> None:
        """Undo `reserve` for a job that was not stored after all."""
        if self.limits.limits_tokens:
            settle(job_id, 0, self.settings)

    def _admit(self, job_id: uuid.UUID, tokens: int, samples: int) -> list[int]:
        limits, settings = self.limits, self.settings
        reservation_ms = int(1000 * max(settings.rate_limit_day_seconds, settings.job_ttl_seconds)) + 60_000
        args: list[str | int] = [
            self.prefix,
            str(job_id),
            tokens,
            limits.tokens_per_minute,
            limits.tokens_per_day,
            _ms(settings.rate_limit_window_seconds),
            _ms(settings.rate_limit_day_seconds),
            limits.max_concurrent_jobs,
            reservation_ms,
            samples,
        ]
        return [int(value) for value in sync_redis(settings.redis_url).register_script(_ADMIT)(args=args)]

    def _token_headers(self, tokens: int, minute_used: int, minute_reset: int, day_used: int, day_reset: int) -> None:
        """OpenAI's -tokens trio, for the token limit nearer its end (after this request)."""
        windows = [
            (limit, limit - used - tokens, reset)
            for limit, used, reset in (
                (self.limits.tokens_per_minute, minute_used, minute_reset),
                (self.limits.tokens_per_day, day_used, day_reset),
            )
            if limit
        ]
        if windows:
            limit, remaining, reset = min(windows, key=lambda window: window[1])
            self.headers |= _trio("tokens", limit, remaining, reset)


def settle(job_id: uuid.UUID, used_tokens: int, settings: Settings) -> bool:
    """The job has ended having used `used_tokens`: its reserved tokens become these, and it leaves
    its key's live jobs. Idempotent (the reservation is deleted as it is settled); True if this
    call settled it. Called after the job's fenced final write committed; Redis errors are logged."""
    try:
        script = sync_redis(settings.redis_url).register_script(_SETTLE)
        return bool(script(keys=[f"{PREFIX}job:{job_id}"], args=[max(used_tokens, 0), str(job_id)]))
    except redis_errors.RedisError as e:
        logger.warning("rate limits: job %s not settled, Redis error: %s", job_id, e)
        return False


def rate_limited(message: str, retry_ms: int) -> LimitExceeded:
    """The 429 of a limit that frees up in `retry_ms`."""
    retry_ms = max(int(retry_ms), 1)
    headers = {"Retry-After": str(math.ceil(retry_ms / 1000)), "retry-after-ms": str(retry_ms)}
    return LimitExceeded(message, code="rate_limit_exceeded", headers=headers)


def _prune(client: redis.Redis, session: Session, prefix: str) -> bool:
    """Drop from a key's live set the jobs the database says have ended (or never were stored,
    after a grace), with their samples; True if any went."""
    members: list[tuple[str, float]] = client.zrange(prefix + "jobs", 0, -1, withscores=True)  # type: ignore[assignment]
    ids = [uuid.UUID(member) for member, _ in members]
    statuses: dict[str, str] = {
        str(job_id): status for job_id, status in session.exec(select(Job.id, Job.status).where(col(Job.id).in_(ids)))
    }
    now_ms = time.time() * 1000
    gone = [
        member
        for member, admitted_ms in members
        if statuses.get(member) not in (JobStatus.queued, JobStatus.running)
        and (member in statuses or now_ms - admitted_ms > UNCOMMITTED_GRACE_MS)
    ]
    if not gone:
        return False
    client.hdel(prefix + "samples", *gone)
    return bool(client.zrem(prefix + "jobs", *gone))


def _trio(kind: str, limit: int, remaining: int, reset_ms: int) -> dict[str, str]:
    return {
        f"x-ratelimit-limit-{kind}": str(limit),
        f"x-ratelimit-remaining-{kind}": str(max(remaining, 0)),
        f"x-ratelimit-reset-{kind}": _duration(reset_ms),
    }


def _duration(ms: int) -> str:
    """OpenAI's reset format: 20ms, 1.5s, 6m0s, 2h3m4s."""
    if ms < 1000:
        return f"{ms}ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:g}s"
    hours, rest = divmod(int(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes}m{secs}s" if hours else f"{minutes}m{secs}s"


def _ms(seconds: float) -> int:
    return max(int(seconds * 1000), 1)


_last_warning = 0.0


def _fail_open(error: Exception) -> None:
    """Admit, and say so in the log (once a minute per process, not once per request)."""
    global _last_warning
    if time.monotonic() - _last_warning > 60:
        _last_warning = time.monotonic()
        logger.warning("rate limits not enforced: Redis error (%s); requests are admitted", error)


@lru_cache(maxsize=4)
def sync_redis(url: str) -> redis.Redis:
    """This process's blocking client of short commands at `url`, with short timeouts: the limiter's
    (create_job runs in a thread; workers settle) and the webhook receivers' slots'."""
    return redis.Redis.from_url(url, decode_responses=True, socket_timeout=5, socket_connect_timeout=2)
