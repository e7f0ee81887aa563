"""The job's Redis stream as its worker writes it: every write fenced by the claim (the stream's
owner key names the attempt that may write), so a stale worker's appends add nothing."""

from __future__ import annotations

import json
import logging

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
# KEYS: stream, owner. ARGV: attempt, worker, owner ttl, mode, [checkpoint entry id, rewind, tokens].
# Returns {1, tokens thrown away}, or 0 (nothing changed) when a later attempt owns the stream.
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
return {1, wasted}
"""
# ARGV: owner, then (type, delta, at, sample) quadruples to append (`sample`: which of an n-sample
# job's samples the delta is of). Returns the last entry's id, or 0 (nothing written) when not the
# owner.
FENCED_XADD = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
local id = 0
for i = 2, #ARGV, 4 do
  id = redis.call('XADD', KEYS[1], '*', 'type', ARGV[i], 'delta', ARGV[i + 1], 'at', ARGV[i + 2], 'sample', ARGV[i + 3])
end
return id
"""


class JobStream:
    """The job's Redis stream, written only under the claim (CLAIM_STREAM above).

    The stream is a live view; the row is the record. So Redis being away (restarting from its AOF,
    say) does not stop the job: entries wait in memory and go out, in order, with the next append
    that reaches Redis."""

    def __init__(self, redis, claim: Claim) -> None:
        self.redis, self.claim = redis, claim
        self.keys = [stream_key(claim.job_id), stream_owner_key(claim.job_id)]
        self.pending: list[str | int] = []  # (type, delta, at, sample) values not yet in the stream, flattened
        self.last_id: str | None = None  # the last entry this attempt wrote (a checkpoint records it)
        self.deferring = False  # Redis was unreachable at the last append

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
        self.last_id = resume_after
        return int(taken[1])

    def append(self, *entries: tuple[str, str, int, int]) -> None:
        """(type, delta, at, sample) entries, `at` the job's completion tokens once the delta was
        generated; a LostClaim when this attempt no longer owns the stream."""
        self.pending += [value for entry in entries for value in entry]
        if not self.pending:
            return
        try:
            written = self.redis.eval(FENCED_XADD, 2, *self.keys, self.claim.stream_owner, *self.pending)
        except redis_errors.ConnectionError as e:  # (TimeoutError is one) kept for the next append
            if not self.deferring:  # once per outage, not once per token
                logger.warning("job %s: stream writes deferred, Redis unreachable: %s", self.claim.job_id, e)
            self.deferring = True
            return
        if not written:
            raise LostClaim("another attempt owns the stream")
        if self.deferring:
            logger.warning("job %s: stream writes caught up (%d values)", self.claim.job_id, len(self.pending))
        self.pending, self.last_id, self.deferring = [], written, False

    def end(self, ttl_seconds: int) -> None:
        self.append(("done", "", 0, 0))
        try:
            self.redis.expire(self.keys[0], ttl_seconds)
        except redis_errors.ConnectionError:
            logger.warning("job %s: stream end not written, Redis unreachable", self.claim.job_id)
