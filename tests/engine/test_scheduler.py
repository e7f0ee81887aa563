"""Continuous batching decisions, without a model: token budget, chunking, preemption, rejection."""

import pytest

from ponder.engine.config import EngineConfig, SamplingParams
from ponder.engine.errors import RequestRejected
from ponder.engine.scheduler import SampledTokens, Scheduler
from ponder.engine.sequence import Sequence, SequenceStatus


def make(num_blocks=64, block_size=8, budget=64, max_num_seqs=8, max_model_len=256) -> Scheduler:
    config = EngineConfig(block_size=block_size, max_num_batched_tokens=budget, max_num_seqs=max_num_seqs)
    return Scheduler(config, num_blocks=num_blocks, max_model_len=max_model_len, eos_token_ids=[0])


def request(request_id: str, prompt_len: int, max_tokens: int = 8, **params) -> Sequence:
    return Sequence(request_id, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens, **params))


def run_step(scheduler: Scheduler, token: int = 7):
    scheduled = scheduler.schedule()
    sampled = [SampledTokens([token] if s.completes else []) for s in scheduled]
    scheduler.update(scheduled, sampled)
    return scheduled


def test_chunked_prefill_respects_the_budget():
    s = make(budget=16)
    s.add(request("a", 40))
    chunks = [run_step(s)[0].num_new_tokens for _ in range(3)]
    assert chunks == [16, 16, 8]
    seq = s.running[0]
    assert seq.num_output_tokens == 1  # only the step that finished the prompt sampled


def test_decodes_and_prefill_chunks_share_a_step():
    s = make(budget=16)
    s.add(request("a", 4))
    run_step(s)  # a's prompt done, first token sampled
    s.add(request("b", 30))  # joins while a decodes
    scheduled = run_step(s)
    assert [(x.seq.request_id, x.num_new_tokens) for x in scheduled] == [("a", 1), ("b", 15)]
    assert sum(x.num_new_tokens for x in scheduled) <= 16


def test_max_num_seqs_caps_running():
    s = make(max_num_seqs=2)
    for i in range(4):
        s.add(request(str(i), 4))
    run_step(s)
    assert len(s.running) == 2 and len(s.waiting) == 2


def test_preemption_takes_newest_and_requeues_it_first():
    # 6 blocks of 4 tokens: a and b each hold 2 blocks after prefill, c holds 2.
    s = make(num_blocks=6, block_size=4, budget=64)
    for name in "abc":
        s.add(request(name, 8, max_tokens=8))
    run_step(s)  # all three prompts computed (8 tokens each = 2 blocks), 1 token each sampled
    assert s.block_manager.num_free_blocks == 0
    run_step(s)  # a and b each need a third block: c (newest) gives back its two
    c = next(x for x in s.waiting)
    assert c.request_id == "c" and c.status == SequenceStatus.WAITING
    assert c.num_computed_tokens == 0 and c.block_table == [] and c.num_preemptions == 1
    assert s.num_preemptions >= 1
    assert [x.request_id for x in s.running] == ["a", "b"]


def test_preempted_sequence_keeps_its_tokens_and_finishes():
    s = make(num_blocks=6, block_size=4, budget=64)
    for name in "abc":
        s.add(request(name, 8, max_tokens=8))
    steps = 0
    while s.has_unfinished():
        run_step(s)
        steps += 1
        assert steps < 100
    assert s.num_preemptions >= 1
    assert s.block_manager.num_free_blocks == 6


def test_rejects_what_can_never_run():
    s = make(num_blocks=4, block_size=8, max_model_len=100)
    with pytest.raises(RequestRejected, match="exceeds max_model_len 100"):
        s.add(request("long", 90, max_tokens=20))
    with pytest.raises(RequestRejected, match="whole cache has 4"):
        s.add(request("big", 30, max_tokens=10))  # 40 tokens need 5 blocks of 8
    with pytest.raises(RequestRejected, match="empty"):
        s.add(Sequence("empty", [], SamplingParams()))
    assert not s.has_unfinished()


def test_finish_reasons():
    s = make()
    s.add(request("eos", 4, max_tokens=8))
    s.add(request("stop_id", 4, max_tokens=8, stop_token_ids=[5]))
    s.add(request("len", 4, max_tokens=2))
    s.add(request("ignore", 4, max_tokens=2, ignore_eos=True))
    scheduled = s.schedule()
    tokens = {"eos": 0, "stop_id": 5, "len": 3, "ignore": 0}
    s.update(scheduled, [SampledTokens([tokens[x.seq.request_id]]) for x in scheduled])
    run_step(s, token=3)
    reasons = {x.seq.request_id: x.seq.finish_reason for x in scheduled}
    assert reasons == {"eos": "stop", "stop_id": "stop", "len": "length", "ignore": "length"}
    assert not s.has_unfinished()
