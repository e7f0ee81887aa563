"""The public engine API: imports, LLMEngine's request lifecycle, abort, rejections."""

from __future__ import annotations

import pytest

from ponder.engine import SamplingParams
from ponder.engine.errors import RequestRejected


def test_public_names():
    from ponder.engine import EngineConfig, SamplingParams  # noqa: F401
    from ponder.engine.runtime import LLM, LLMEngine  # noqa: F401

    with pytest.raises(ImportError):
        from ponder.engine import NoSuchThing  # noqa: F401


def test_step_deltas_and_final_output(make_llm):
    engine = make_llm("tiny-qwen2").engine
    engine.add_request("r1", list(b"hello"), SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert [len(o.new_token_ids) for o in outputs] == [1] * 5
    final = outputs[-1]
    assert final.finished and not any(o.finished for o in outputs[:-1])
    assert final.token_ids == [t for o in outputs for t in o.new_token_ids]
    assert final.usage.as_dict() == {
        "prompt_tokens": 5,
        "cached_tokens": 0,
        "completion_tokens": 5,
        "reasoning_tokens": 0,
        "total_tokens": 10,
    }
    m = final.metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finished_time


def test_abort_frees_blocks_and_reports_abort(make_llm):
    engine = make_llm("tiny-qwen2").engine
    free_before = engine.scheduler.block_manager.num_free_blocks
    engine.add_request("keep", list(b"abc"), SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    engine.add_request("drop", list(b"x" * 40), SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    engine.step()
    engine.abort_request("drop")
    engine.abort_request("unknown-id")  # ignored
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert finished["drop"].finish_reason == "abort" and len(finished["drop"].token_ids) == 1
    assert finished["keep"].finish_reason == "length" and len(finished["keep"].token_ids) == 6
    assert engine.scheduler.block_manager.num_free_blocks == free_before


def test_rejections_leave_nothing_behind(make_llm):
    llm = make_llm("tiny-qwen2", max_model_len=64)
    engine = llm.engine
    with pytest.raises(RequestRejected, match="exceeds max_model_len 64"):
        engine.add_request("long", list(range(60)), SamplingParams(max_tokens=10))
    with pytest.raises(RequestRejected, match="token ids must be integers"):
        engine.add_request("bad", [1, 2, 10_000], SamplingParams())
    engine.add_request("dup", [1, 2], SamplingParams(max_tokens=1))
    with pytest.raises(RequestRejected, match="already in use"):
        engine.add_request("dup", [1, 2], SamplingParams())
    while engine.has_unfinished_requests():
        engine.step()
    # A batch with one bad prompt runs none of them.
    with pytest.raises(RequestRejected):
        llm.generate([[1, 2, 3], list(range(70))], SamplingParams(max_tokens=2))
    assert not engine.has_unfinished_requests()
    assert engine.scheduler.block_manager.num_free_blocks == engine.scheduler.block_manager.num_blocks


def test_cache_too_small_for_one_request_is_rejected(make_llm):
    engine = make_llm("tiny-qwen2", num_kv_blocks=2).engine  # 32 tokens in all
    with pytest.raises(RequestRejected, match="whole cache has 2"):
        engine.add_request("big", list(range(30)), SamplingParams(max_tokens=10))


def test_prompt_strings_and_token_lists(make_llm):
    llm = make_llm("tiny-qwen2")
    params = SamplingParams(temperature=0, max_tokens=3)
    by_text, by_ids = llm.generate(["hey", list(b"hey")], params)
    assert by_text.token_ids == by_ids.token_ids and by_text.usage.prompt_tokens == 3
