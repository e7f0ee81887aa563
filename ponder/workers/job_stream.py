"""The job's Redis stream as its worker writes it: every write fenced by the claim (the stream's
owner key names the attempt that may write), so a stale worker's appends add nothing."""

from __future__ import annotations

import json
import logging
import math
import time

from redis import exceptions as redis_errors

from ponder.service.streams import stream_key, stream_owner_key
from ponder.workers.claim import Claim, LostClaim

logger = logging.getLogger("ponder.worker")

# The stream's fence. A worker writes its job's stream only while it holds the job's latest claim:
# claiming sets the owner (never back to an older attempt) and then, for a re-run, either starts
# the stream over (`restart`: DEL + a `reset` entry) or resumes it where its checkpoint was taken
# (`resume`: the entries after ARGV[5], written after the checkpoint by the attempt that died,
# are deleted, and if there were any a `rewind` entry (ARGV[6]: the text lengths to keep) tells
# clients who saw them to drop them). Every later write checks the owner in the same script, so a
# stale worker's write (its lease lapsed and another worker claimed the job) adds nothing.
# Delta entries carry `at`, the job's completion tokens once the entry's text was generated, so
# the claim can say how many generated tokens it throws away: all of them on a restart, those past
# the checkpoint's ARGV[7] tokens on a resume.
# KEYS: stream, owner. ARGV: attempt, worker, ttl (the owner's and the stream's), mode, [checkpoint
# entry id, rewind, tokens]. Returns {1, tokens thrown away}, or 0 (nothing changed) when a later
# attempt owns the stream.
CLAIM_STREAM = """
local current = redis.call('GET', KEYS[2])
if current and tonumber(string.match(current, '^(%d+):')) > tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[2], ARGV[1] .. ':' .. ARGV[2], 'EX', ARGV[3])
local function generated(entry)
  for i = 1, #entry[2], 2 do
    if entry[2][i] == 'at' then return tonumber(entry[2][i + 1]) end
  end
  return nil
end
local wasted = 0
if ARGV[4] == 'restart' then
  for _, entry in ipairs(redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 16)) do
    local at = generated(entry)
    if at then wasted = at break end
  end
  redis.call('DEL', KEYS[1])
  redis.call('XADD', KEYS[1], '*', 'type', 'reset')
elseif ARGV[4] == 'resume' then
  local after = redis.call('XRANGE', KEYS[1], ARGV[5], '+')
  local dropped = 0
  for _, entry in ipairs(after) do
    if entry[1] ~= ARGV[5] then
      redis.call('XDEL', KEYS[1], entry[1])
      dropped = dropped + 1
      local at = generated(entry)
      if at then wasted = math.max(wasted, at - tonumber(ARGV[7])) end
    end
  end
  if dropped > 0 then redis.call('XADD', KEYS[1], '*', 'type', 'rewind', 'delta', ARGV[6]) end
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
return {1, wasted}
"""
# ARGV: owner, ttl, then (type, delta, at, sample) quadruples to append (`sample`: which of an
# n-sample job's samples the delta is of). Every append renews the stream's expiry: a stream whose
# job ended without its worker (lost, cancelled by beat) still goes. Returns the last entry's id,
# or 0 (nothing written) when not the owner.
FENCED_XADD = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
local id = 0
for i = 3, #ARGV, 4 do
  id = redis.call('XADD', KEYS[1], '*', 'type', ARGV[i], 'delta', ARGV[i + 1], 'at', ARGV[i + 2], 'sample', ARGV[i + 3])
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return id
"""
# Deltas are written at most this often (a step's tokens, coalesced per sample and kind): an entry
# per token per sample made millions of entries for a long n = 64 job.
WRITE_INTERVAL_SECONDS = 0.1

Entry = tuple[str, str, int, int]  # (type, delta, at, sample)


class JobStream:
    """The job's Redis stream, written only under the claim (CLAIM_STREAM above).

    The stream is a live view; the row is the record. So Redis being away (restarting from its AOF,
    say) does not stop the job: entries wait in memory and go out, in order, with the next append
    that reaches Redis."""

    def __init__(self, redis, claim: Claim) -> None:
        self.redis, self.claim = redis, claim
        self.keys = [stream_key(claim.job_id), stream_owner_key(claim.job_id)]
        self.pending: dict[tuple[str, int], Entry] = {}  # not yet in the stream, by (type, sample), in order
        self.last_id: str | None = None  # the last entry this attempt wrote (a checkpoint records it)
        self.deferring = False  # Redis was unreachable at the last append
        self.ttl = 0  # while the job runs: its deadline and then the stream's own time (`take`)
        self.written_at = -math.inf

    def take(
        self,
        ttl_seconds: int,
        mode: str = "",
        resume_after: str | None = None,
        keep: dict | None = None,
        resumed_tokens: int = 0,
    ) -> int:
        """Become the stream's writer; mode "restart" starts it over, "resume" drops the entries after
        `resume_after` (the checkpoint's, at `resumed_tokens`) and tells clients to `keep` that much
        text. Returns how many generated tokens the stream shows this throws away."""
        args = [self.claim.attempt, self.claim.worker, ttl_seconds, mode, resume_after or "0", json.dumps(keep or {})]
        taken = self.redis.eval(CLAIM_STREAM, 2, *self.keys, *args, resumed_tokens)
        if not taken:
            raise LostClaim(f"a later attempt than {self.claim.attempt} owns the stream")
        self.last_id, self.ttl = resume_after, ttl_seconds
        return int(taken[1])

    def append(self, *entries: Entry) -> None:
        """(type, delta, at, sample) entries, `at` the job's completion tokens once the delta was
        generated: each joins the pending one of its sample and kind (a sample's reasoning all comes
        before its content), and they are written once WRITE_INTERVAL_SECONDS have passed since the
        last write. A LostClaim when this attempt no longer owns the stream."""
        for kind, delta, at, sample in entries:
            earlier = self.pending.get((kind, sample))
            self.pending[(kind, sample)] = (kind, (earlier[1] if earlier else "") + delta, at, sample)
        if time.monotonic() - self.written_at >= WRITE_INTERVAL_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Write what is pending now (before a checkpoint names the last entry written, and at the end)."""
        if not self.pending:
            return
        values = [value for entry in self.pending.values() for value in entry]
        try:
            written = self.redis.eval(FENCED_XADD, 2, *self.keys, self.claim.stream_owner, self.ttl, *values)
        except redis_errors.ConnectionError as e:  # (TimeoutError is one) kept for the next append
            if not self.deferring:  # once per outage, not once per token
                logger.warning("job %s: stream writes deferred, Redis unreachable: %s", self.claim.job_id, e)
            self.deferring = True
            return
        if not written:
            raise LostClaim("another attempt owns the stream")
        if self.deferring:
            logger.warning("job %s: stream writes caught up (%d entries)", self.claim.job_id, len(self.pending))
        self.pending, self.last_id, self.deferring = {}, written, False
        self.written_at = time.monotonic()

    def end(self, ttl_seconds: int) -> None:
        self.append(("done", "", 0, 0))
        self.flush()
        try:
            self.redis.expire(self.keys[0], ttl_seconds)
        except redis_errors.ConnectionError:
            logger.warning("job %s: stream end not written, Redis unreachable", self.claim.job_id)
