"""Parallel sampling (`SamplingParams.n`, docs/architecture.md#parallel-sampling): the prompt is
prefilled once and forked into n samples sharing its blocks; a shared, partly filled block is
copied on write; sample i draws what an n=1 request with `sample_index=i` draws; each sample stops,
thinks, drafts, is preempted and is aborted on its own; every block is freed exactly once."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from ponder.engine import SamplingParams
from ponder.engine.block_manager import BlockManager
from ponder.engine.config import EngineConfig
from ponder.engine.errors import ConfigError, RequestRejected
from ponder.engine.outputs import RequestOutput
from ponder.engine.runtime.seeding import mix_seed
from ponder.engine.scheduler import SampledTokens, Scheduler
from ponder.engine.sequence import Sequence
from tests.engine.test_against_transformers import hf_greedy, prompts_for

MODEL = "tiny-llama"
PROMPT = [(7 * i + 3) % 250 + 1 for i in range(20)]  # a full block of 16, and 4 tokens in the next


def seeded(**fields) -> SamplingParams:
    return SamplingParams(**{"temperature": 1.0, "seed": 1234, "max_tokens": 12, "ignore_eos": True, **fields})


def greedy(**fields) -> SamplingParams:
    return SamplingParams(**{"temperature": 0, "max_tokens": 12, "ignore_eos": True, **fields})


def check_blocks(engine) -> None:
    """Every block's ref count is the number of sequences holding it; free exactly when 0."""
    scheduler, bm = engine.scheduler, engine.scheduler.block_manager
    held = Counter(b for seq in [*scheduler.running, *scheduler.waiting] for b in seq.block_table)
    assert [block.ref_count for block in bm.blocks] == [held[block.block_id] for block in bm.blocks]
    assert set(bm.free_block_ids) == {block.block_id for block in bm.blocks if block.ref_count == 0}


def run(engine) -> dict[str, list[RequestOutput]]:
    """Step to the end, checking the blocks after every step; every output by request."""
    outputs: dict[str, list[RequestOutput]] = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            outputs.setdefault(output.request_id, []).append(output)
        check_blocks(engine)
    return outputs


def samples_of(engine, request_id: str) -> list[Sequence]:
    seqs = [s for s in [*engine.scheduler.running, *engine.scheduler.waiting] if s.request_id == request_id]
    return sorted(seqs, key=lambda s: s.index)


def test_the_prompt_is_computed_once_and_each_sample_streams_its_own_text(make_llm):
    engine = make_llm(MODEL).engine
    free = engine.scheduler.block_manager.num_free_blocks
    before = engine.snapshot()
    engine.add_request("n4", PROMPT, seeded(n=4))
    outputs = run(engine)["n4"]
    after = engine.snapshot()
    final = outputs[-1]
    assert final.finished and not any(o.finished for o in outputs[:-1])
    assert after.prefill_tokens - before.prefill_tokens == len(PROMPT)  # not 4 x
    assert [c.index for c in final.outputs] == [0, 1, 2, 3]
    assert len({tuple(c.token_ids) for c in final.outputs}) == 4  # four different samples
    assert all(c.finish_reason == "length" and c.completion_tokens == 12 for c in final.outputs)
    assert final.usage.prompt_tokens == len(PROMPT) and final.usage.completion_tokens == 48
    assert after.generated_tokens - before.generated_tokens == 48
    for index in range(4):  # each sample's deltas add up to its final text and ids
        news = [c for o in outputs for c in o.outputs if c.index == index]
        assert [t for c in news for t in c.new_token_ids] == final.outputs[index].token_ids
        assert "".join(c.delta_text for c in news) == final.outputs[index].text
    # The single-sample fields are sample 0's.
    assert (final.token_ids, final.text, final.finish_reason) == (
        final.outputs[0].token_ids,
        final.outputs[0].text,
        "length",
    )
    assert [t for o in outputs for t in o.new_token_ids] == final.outputs[0].token_ids
    assert engine.scheduler.block_manager.num_free_blocks == free


def test_sample_i_is_the_single_request_with_sample_index_i(make_llm):
    llm = make_llm(MODEL)
    (many,) = llm.generate(PROMPT, seeded(n=3))
    singles = llm.generate([PROMPT] * 3, [seeded(sample_index=i) for i in range(3)])
    assert [c.token_ids for c in many.outputs] == [s.token_ids for s in singles]
    (plain,) = llm.generate(PROMPT, seeded())
    assert many.outputs[0].token_ids == plain.token_ids  # sample 0 is the plain request
    (shifted,) = llm.generate(PROMPT, seeded(n=2, sample_index=1))  # samples 1 and 2
    assert [c.token_ids for c in shifted.outputs] == [s.token_ids for s in singles[1:]]
    (greedy_many,) = llm.generate(PROMPT, greedy(n=3))
    (greedy_one,) = llm.generate(PROMPT, greedy())
    assert all(c.token_ids == greedy_one.token_ids for c in greedy_many.outputs)


def test_stream_zero_is_the_plain_seed_position_mix():
    # Seeded outputs stored before parallel sampling stay valid: stream 0 mixes (seed, position) as before.
    def before(seed: int, position: int) -> int:
        z = (seed + (position + 1) * 0x9E3779B97F4A7C15) % (1 << 64)
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % (1 << 64)
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % (1 << 64)
        return z ^ (z >> 31)

    for seed in (0, 1234, -(2**63), 2**64 - 1):
        for position in (0, 5, 4095):
            assert mix_seed(seed, 0, position) == before(seed, position)
    streams = {mix_seed(1234, stream, position) for stream in range(64) for position in range(64)}
    assert len(streams) == 64 * 64


@pytest.mark.parametrize("model", [MODEL, "tiny-r1"])  # K/V caches; MLA's latent cache
def test_a_shared_partial_block_is_copied_on_write(model, make_llm):
    engine = make_llm(model).engine
    bm, runner = engine.scheduler.block_manager, engine.model_runner
    free = bm.num_free_blocks
    engine.add_request("cow", PROMPT, seeded(n=3, max_tokens=6))
    engine.step()  # the prompt, then the fork: three samples with one first token each
    samples = samples_of(engine, "cow")
    assert [s.index for s in samples] == [0, 1, 2] and all(s.num_output_tokens == 1 for s in samples)
    assert all(s.block_table == samples[0].block_table for s in samples)  # shared, not copied yet
    full, partial = samples[0].block_table
    assert bm.blocks[full].ref_count == bm.blocks[partial].ref_count == 3
    at_fork = [
        getattr(layer, name)[partial].clone() for layer in runner.cache_layers for name in layer.kv_cache_shapes(1, 1)
    ]
    engine.step()  # each sample writes its first token into block 1: two take copies, the last keeps it
    tables = [s.block_table for s in samples]
    assert all(table[0] == full for table in tables) and bm.blocks[full].ref_count == 3  # read-only, shared
    copies = [table[1] for table in tables]
    assert len(set(copies)) == 3 and copies[-1] == partial
    filled = len(PROMPT) % bm.block_size
    caches = [getattr(layer, name) for layer in runner.cache_layers for name in layer.kv_cache_shapes(1, 1)]
    for cache, original in zip(caches, at_fork, strict=True):
        for block in copies:
            assert torch.equal(cache[block, :filled], original[:filled])
    check_blocks(engine)
    run(engine)
    assert bm.num_free_blocks == free


def test_sample_0_greedy_is_transformers_greedy(make_llm, hf_model):
    prompt = prompts_for(MODEL, lengths=(37,))[0]
    (out,) = make_llm(MODEL).generate(prompt, greedy(n=2, max_tokens=32))
    assert out.outputs[0].token_ids == out.outputs[1].token_ids == hf_greedy(hf_model(MODEL), prompt)


def test_preempting_samples_changes_no_tokens(make_llm):
    # 8 blocks of 16 cannot hold 4 samples of up to 60 tokens (1 shared + 3 own blocks each).
    params = seeded(n=4, max_tokens=40)
    (undisturbed,) = make_llm(MODEL).generate(PROMPT, params)
    engine = make_llm(MODEL, num_kv_blocks=8).engine
    engine.add_request("small", PROMPT, params)
    final = run(engine)["small"][-1]
    assert final.metrics.num_preemptions > 0
    assert [c.token_ids for c in final.outputs] == [c.token_ids for c in undisturbed.outputs]
    assert engine.scheduler.block_manager.num_free_blocks == 8


def test_aborting_a_sample_frees_its_blocks_and_the_others_go_on(make_llm):
    llm = make_llm(MODEL)
    engine, bm = llm.engine, llm.engine.scheduler.block_manager
    free = bm.num_free_blocks
    params = seeded(n=3, max_tokens=30)
    (undisturbed,) = llm.generate(PROMPT, params)
    engine.add_request("vote", PROMPT, params)
    for _ in range(3):  # the fork, then two tokens more each
        engine.step()
    stopped = samples_of(engine, "vote")[1]
    own = [b for b in stopped.block_table if bm.blocks[b].ref_count == 1]
    free_before = bm.num_free_blocks
    assert engine.abort_sample("vote", 1)
    assert bm.num_free_blocks == free_before + len(own) and stopped.block_table == []
    assert not engine.abort_sample("vote", 1) and not engine.abort_sample("vote", 7)
    check_blocks(engine)
    outputs = run(engine)["vote"]
    assert [c.finish_reason for c in outputs[0].outputs] == ["abort"]  # reported by the next step
    final = outputs[-1]
    assert [c.finish_reason for c in final.outputs] == ["length", "abort", "length"]
    assert final.outputs[1].token_ids == undisturbed.outputs[1].token_ids[:3]
    assert [final.outputs[i].token_ids for i in (0, 2)] == [undisturbed.outputs[i].token_ids for i in (0, 2)]
    assert final.usage.completion_tokens == 30 + 3 + 30
    assert bm.num_free_blocks == free


def test_aborting_the_request_aborts_every_sample(make_llm):
    engine = make_llm(MODEL).engine
    bm = engine.scheduler.block_manager
    free = bm.num_free_blocks
    engine.add_request("forked", PROMPT, seeded(n=3, max_tokens=30))
    engine.step()
    engine.step()
    engine.add_request("unforked", PROMPT, seeded(n=3, max_tokens=30))
    assert len(samples_of(engine, "forked")) == 3 and len(samples_of(engine, "unforked")) == 1
    engine.abort_request("forked")
    assert not engine.abort_sample("unforked", 0)  # its samples do not exist yet: abort_request
    engine.abort_request("unforked")
    assert bm.num_free_blocks == free
    outputs = run(engine)
    forked, unforked = outputs["forked"][-1], outputs["unforked"][-1]
    assert [c.finish_reason for c in forked.outputs] == ["abort"] * 3
    assert all(len(c.token_ids) == 2 for c in forked.outputs)
    assert [c.finish_reason for c in unforked.outputs] == ["abort"] * 3 and unforked.usage.completion_tokens == 0
    assert bm.num_free_blocks == free and all(block.ref_count == 0 for block in bm.blocks)


def test_each_sample_stops_on_its_own(make_llm):
    llm = make_llm(MODEL)
    (whole,) = llm.generate(PROMPT, seeded(n=3))
    stop = whole.outputs[1].token_ids[3]
    (stopped,) = llm.generate(PROMPT, seeded(n=3, stop_token_ids=[stop]))
    for got, full in zip(stopped.outputs, whole.outputs, strict=True):
        if stop in full.token_ids:
            assert got.finish_reason == "stop" and got.token_ids == full.token_ids[: full.token_ids.index(stop) + 1]
        else:
            assert got.finish_reason == "length" and got.token_ids == full.token_ids
    assert stopped.usage.completion_tokens == sum(len(c.token_ids) for c in stopped.outputs)


@pytest.mark.parametrize("budget", [0, 4])
def test_each_sample_has_its_own_thinking_budget(budget, make_llm):
    llm = make_llm("tiny-r1")  # R1's tokenizer and template (the prompt opens <think>), MLA
    prompt = llm.tokenizer.encode_chat([{"role": "user", "content": "What is 2 + 3?"}])
    params = {"max_tokens": 16, "max_reasoning_tokens": budget}
    (many,) = llm.generate([prompt], seeded(n=3, **params))
    singles = llm.generate([prompt] * 3, [seeded(sample_index=i, **params) for i in range(3)])
    for got, want in zip(many.outputs, singles, strict=True):
        assert (got.token_ids, got.reasoning_content, got.content) == (
            want.token_ids,
            want.reasoning_content,
            want.content,
        )
        assert (got.completion_tokens, got.reasoning_tokens) == (
            want.usage.completion_tokens,
            want.usage.reasoning_tokens,
        )
        assert got.content and got.reasoning_tokens > budget  # the budget forced the end of thinking
    assert many.usage.reasoning_tokens == sum(s.usage.reasoning_tokens for s in singles)


def test_prefix_caching_serves_a_forked_request(make_llm):
    llm = make_llm(MODEL, enable_prefix_caching=True)
    (first,) = llm.generate(PROMPT, seeded(n=3))
    (again,) = llm.generate(PROMPT, seeded(n=3))
    assert again.usage.cached_tokens == 16
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in first.outputs]


@pytest.mark.slow
def test_speculative_decoding_drafts_for_every_sample(make_llm):
    # tiny-r1-mtp (MLA + an MTP layer): prompts ending mid-block, at a block's end, and chunked.
    prompts = [PROMPT, list(range(300, 332)), list(range(300, 317))]
    chunked = {"max_num_batched_tokens": 16}
    plain = make_llm("tiny-r1-mtp", **chunked)
    drafting = make_llm("tiny-r1-mtp", num_speculative_tokens=1, **chunked)
    expected = [o.token_ids for o in plain.generate(prompts, greedy(max_tokens=16))]
    outputs = drafting.generate(prompts, greedy(n=3, max_tokens=16))
    assert [[c.token_ids for c in o.outputs] for o in outputs] == [[e] * 3 for e in expected]
    assert sum(o.metrics.num_accepted_tokens for o in outputs) > 0
    # Each sample's drafter cache is its own: seeded samples draw what single requests draw.
    (many,) = drafting.generate([prompts[0]], seeded(n=3, top_k=4))
    singles = [drafting.generate([prompts[0]], seeded(sample_index=i, top_k=4))[0] for i in range(3)]
    assert [c.token_ids for c in many.outputs] == [s.token_ids for s in singles]
    assert many.metrics.num_draft_tokens > 0
    assert drafting.engine.scheduler.block_manager.num_free_blocks == drafting.engine.scheduler.block_manager.num_blocks


def test_parameters_and_requests_that_cannot_fork_are_refused(make_llm):
    for bad in ({"n": 0}, {"n": 65}, {"n": 2.0}, {"sample_index": -1}, {"sample_index": 2**32}):
        with pytest.raises(ConfigError):
            SamplingParams(**bad)
    engine = make_llm(MODEL).engine
    with pytest.raises(RequestRejected, match="resume sample i with n=1"):
        engine.add_request("resumed", PROMPT, seeded(n=2), output_token_ids=[5])
    small = make_llm(MODEL, max_num_seqs=2).engine
    with pytest.raises(RequestRejected, match="exceed max_num_seqs 2"):
        small.add_request("wide", PROMPT, seeded(n=3))
    assert not engine.has_unfinished_requests() and not small.has_unfinished_requests()


# -- bookkeeping without a model --------------------------------------------------------------


def scheduler(num_blocks=16, max_num_seqs=8) -> Scheduler:
    config = EngineConfig(block_size=8, max_num_batched_tokens=64, max_num_seqs=max_num_seqs)
    return Scheduler(config, num_blocks=num_blocks, max_model_len=256)


def step(s: Scheduler, token: int = 7) -> list:
    scheduled = s.schedule()
    s.update(
        scheduled,
        [SampledTokens([token + i for i in range(item.num_samples)] if item.completes else []) for item in scheduled],
    )
    return scheduled


def test_the_fork_shares_blocks_and_copies_the_partial_one_on_write():
    s = scheduler()
    s.add(Sequence("r", list(range(1, 11)), SamplingParams(n=3, max_tokens=4)))  # 10 tokens: blocks of 8 + 2
    (item,) = step(s)
    assert item.num_samples == 3 and [c.index for c in item.forked] == [1, 2]
    parent = item.seq
    assert [seq.output_token_ids for seq in s.running] == [[7], [8], [9]]
    assert all(seq.block_table == parent.block_table for seq in s.running)
    assert [s.block_manager.blocks[b].ref_count for b in parent.block_table] == [3, 3]
    step(s)
    full, partial = parent.block_table[0], item.forked[-1].block_table[1]
    copies = s.block_manager.take_copies()
    assert [source for source, _ in copies] == [partial, partial]  # samples 0 and 1 copy; 2 keeps it
    assert [seq.block_table for seq in s.running] == [[full, copies[0][1]], [full, copies[1][1]], [full, partial]]
    while s.has_unfinished():
        step(s)
    assert s.block_manager.num_free_blocks == 16
    assert all(block.ref_count == 0 for block in s.block_manager.blocks)


def test_a_request_to_fork_takes_n_seats():
    s = scheduler(max_num_seqs=4)
    s.add(Sequence("wide", [1, 2, 3], SamplingParams(n=3, max_tokens=4)))
    s.add(Sequence("plain", [4, 5, 6], SamplingParams(max_tokens=4)))
    s.add(Sequence("third", [7, 8, 9], SamplingParams(max_tokens=4)))
    step(s)
    assert [seq.request_id for seq in s.running] == ["wide", "plain", "wide", "wide"]
    assert [seq.request_id for seq in s.waiting] == ["third"]


def test_copy_on_write_fails_cleanly_without_free_blocks():
    bm = BlockManager(num_blocks=3, block_size=4)
    parent, child = Sequence("r", [1, 2, 3, 4, 5, 6], SamplingParams(n=2)), Sequence("r", [], SamplingParams(), 1)
    assert bm.ensure_slots(parent, 6)
    parent.num_computed_tokens = child.num_computed_tokens = 6
    bm.fork(parent, child)
    assert bm.copy_on_write(child, 6) and bm.take_copies() == [(parent.block_table[1], child.block_table[1])]
    other = Sequence("r", [], SamplingParams(), 2)
    other.num_computed_tokens = 6
    bm.fork(parent, other)
    assert not bm.copy_on_write(other, 6)  # no free block left: nothing changed
    assert other.block_table == parent.block_table and bm.take_copies() == []
    for seq in (parent, child, other):
        bm.free(seq)
    assert bm.num_free_blocks == 3 and all(block.ref_count == 0 for block in bm.blocks)
