"""The engine's own bookkeeping for operators: what each step did, running totals, and a snapshot
of the scheduler and the KV cache. No torch and no Prometheus: ponder/workers/exporter.py exposes these.

Totals only ever grow (Prometheus counters); rates (tokens/s) are Prometheus' job.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

# Upper bounds (seconds) of the step-latency histogram: a CPU decode step of a tiny model takes
# milliseconds, a long prefill chunk of a large one seconds.
STEP_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class StepStats:
    """What one `step()` did."""

    num_seqs: int = 0  # sequences that shared the forward pass
    num_tokens: int = 0  # tokens computed by it
    num_prefill_tokens: int = 0  # of those, in prompt chunks (and recomputation after a preemption)
    num_generated_tokens: int = 0  # output tokens the step handed back (sampled or forced)
    num_draft_tokens: int = 0  # speculative decoding: drafts the step verified
    num_accepted_tokens: int = 0  # of those, accepted
    seconds: float = 0.0


@dataclass
class EngineTotals:
    """Running totals since the engine started."""

    steps: int = 0
    prefill_tokens: int = 0
    # Summed over requests this equals their usage.completion_tokens: every output token is
    # reported exactly once in some step's RequestOutput.new_token_ids.
    generated_tokens: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    step_seconds: float = 0.0
    # Steps per latency bucket (not cumulative), the last one for slower than every bound.
    step_buckets: list[int] = field(default_factory=lambda: [0] * (len(STEP_SECONDS_BUCKETS) + 1))
    finished: dict[str, int] = field(default_factory=dict)  # finish reason -> requests

    def record(self, step: StepStats, finish_reasons: list[str]) -> None:
        self.steps += 1
        self.prefill_tokens += step.num_prefill_tokens
        self.generated_tokens += step.num_generated_tokens
        self.draft_tokens += step.num_draft_tokens
        self.accepted_tokens += step.num_accepted_tokens
        self.step_seconds += step.seconds
        self.step_buckets[bisect.bisect_left(STEP_SECONDS_BUCKETS, step.seconds)] += 1
        for reason in finish_reasons:
            self.finished[reason] = self.finished.get(reason, 0) + 1


@dataclass(frozen=True)
class EngineSnapshot:
    """The engine at one moment (read from another thread: each number is current, together they
    may be a step apart)."""

    running: int
    waiting: int
    blocks_total: int
    blocks_used: int
    prefix_queried_tokens: int  # prompt tokens looked up in the prefix cache
    prefix_hit_tokens: int  # of those, found there
    preemptions: int
    steps: int
    prefill_tokens: int
    generated_tokens: int
    step_seconds: float
    step_buckets: tuple[int, ...]
    finished: dict[str, int]
    draft_tokens: int = 0  # speculative decoding: drafts verified
    accepted_tokens: int = 0  # of those, accepted

    @property
    def kv_cache_usage(self) -> float:
        return self.blocks_used / self.blocks_total if self.blocks_total else 0.0

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prefix_queried_tokens if self.prefix_queried_tokens else 0.0

    @property
    def draft_acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0


def snapshot(scheduler, totals: EngineTotals) -> EngineSnapshot:
    blocks = scheduler.block_manager
    return EngineSnapshot(
        running=len(scheduler.running),
        waiting=len(scheduler.waiting),
        blocks_total=blocks.num_blocks,
        # Freed blocks that still hold a cached prefix count as free: a new allocation may evict them.
        blocks_used=blocks.num_blocks - blocks.num_free_blocks,
        prefix_queried_tokens=blocks.prefix_queries,
        prefix_hit_tokens=blocks.prefix_hits,
        preemptions=scheduler.num_preemptions,
        steps=totals.steps,
        prefill_tokens=totals.prefill_tokens,
        generated_tokens=totals.generated_tokens,
        step_seconds=totals.step_seconds,
        step_buckets=tuple(totals.step_buckets),
        finished=dict(totals.finished),
        draft_tokens=totals.draft_tokens,
        accepted_tokens=totals.accepted_tokens,
    )
