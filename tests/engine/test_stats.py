"""The engine's bookkeeping for operators: totals that match the requests' usage exactly, the
scheduler and KV-cache snapshot, the step-latency histogram."""

from __future__ import annotations

import random

from ponder.engine import SamplingParams
from ponder.engine.stats import STEP_SECONDS_BUCKETS, EngineTotals, StepStats


def prompts(n: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, 300) for _ in range(length)] for _ in range(n)]


def test_totals_match_the_requests_usage(make_llm):
    llm = make_llm("tiny-llama", max_num_seqs=4, max_num_batched_tokens=64)
    engine = llm.engine
    before = engine.snapshot()
    params = [SamplingParams(max_tokens=n, temperature=0.8, seed=n) for n in (5, 17, 30)]
    outs = llm.generate(prompts(3, 40, seed=1), params)
    after = engine.snapshot()
    usage = [o.usage for o in outs]
    assert after.generated_tokens - before.generated_tokens == sum(u.completion_tokens for u in usage)
    assert after.prefill_tokens - before.prefill_tokens == sum(u.prompt_tokens - u.cached_tokens for u in usage)
    assert after.finished.get("length", 0) - before.finished.get("length", 0) == 3
    assert after.steps - before.steps >= 30 and sum(after.step_buckets) == after.steps
    assert after.step_seconds > before.step_seconds
    assert (after.running, after.waiting, after.blocks_used) == (0, 0, 0)  # finished requests give blocks back


def test_prefix_hits_and_preemptions_are_counted(make_llm):
    llm = make_llm("tiny-llama", num_kv_blocks=12)  # 12 blocks of 16: three long requests cannot all fit
    engine = llm.engine
    shared = prompts(1, 64, seed=2)[0]
    llm.generate(shared + [5, 6, 7], SamplingParams(max_tokens=2, temperature=0))
    before = engine.snapshot()
    llm.generate(shared + [8, 9], SamplingParams(max_tokens=2, temperature=0))
    hit = engine.snapshot()
    assert hit.prefix_hit_tokens - before.prefix_hit_tokens == 64 and 0 < hit.prefix_cache_hit_rate <= 1

    outs = llm.generate(prompts(3, 60, seed=3), SamplingParams(max_tokens=60, temperature=0, ignore_eos=True))
    after = engine.snapshot()
    assert after.preemptions > hit.preemptions
    # Recomputation is prefill work, and still each output token is counted once.
    assert after.prefill_tokens - hit.prefill_tokens > sum(o.usage.prompt_tokens - o.usage.cached_tokens for o in outs)
    assert after.generated_tokens - hit.generated_tokens == sum(o.usage.completion_tokens for o in outs)
    assert after.blocks_total == 12


def test_a_snapshot_mid_run_sees_running_and_used_blocks(make_llm):
    engine = make_llm("tiny-llama", max_num_seqs=2).engine
    for i, prompt in enumerate(prompts(3, 20, seed=4)):
        engine.add_request(f"mid-{i}", prompt, SamplingParams(max_tokens=4, temperature=0))
    engine.step()
    s = engine.snapshot()
    assert (s.running, s.waiting) == (2, 1) and s.blocks_used >= 2 and 0 < s.kv_cache_usage < 1
    assert engine.last_step.num_seqs == 2 and engine.last_step.num_prefill_tokens == 40
    while engine.has_unfinished_requests():
        engine.step()


def test_step_histogram_buckets():
    totals = EngineTotals()
    for seconds in (0.0005, 0.001, 0.003, 99.0):
        totals.record(StepStats(seconds=seconds), [])
    assert totals.step_buckets[0] == 2  # le=0.001 includes its bound
    assert totals.step_buckets[STEP_SECONDS_BUCKETS.index(0.005)] == 1
    assert totals.step_buckets[-1] == 1 and totals.steps == 4
    totals.record(StepStats(num_generated_tokens=3), ["stop", "stop", "abort"])
    assert totals.finished == {"stop": 2, "abort": 1} and totals.generated_tokens == 3
