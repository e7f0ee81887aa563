"""Resuming a request from the output tokens an earlier run generated (`add_request(...,
output_token_ids=...)`, what a worker does with a job's checkpoint): the result is the one the
uninterrupted run gives, greedy and seeded, through the thinking budget and stop strings, and
usage counts each output token once. Seeded noise is a function of (seed, position), so a resumed
request draws what it would have drawn."""

from __future__ import annotations

import itertools

import pytest

from ponder.engine.config import SamplingParams
from ponder.engine.errors import RequestRejected
from ponder.engine.outputs import RequestOutput
from ponder.engine.runtime import LLM

pytestmark = pytest.mark.slow

PROMPT = [(7 * i + 3) % 250 + 1 for i in range(20)]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
SEEDED = SamplingParams(temperature=1.0, top_k=50, seed=1234, max_tokens=24, ignore_eos=True)
_ids = itertools.count()


def resumed(llm: LLM, prompt: list[int], params: SamplingParams, output: list[int]) -> RequestOutput:
    """The request run to the end by the engine, starting from `output` (as a new process would)."""
    request_id = f"resumed-{next(_ids)}"
    llm.engine.add_request(request_id, prompt, params, output_token_ids=output)
    final = None
    while llm.engine.has_unfinished_requests():
        for out in llm.engine.step():
            if out.request_id == request_id and out.finished:
                final = out
    assert final is not None
    return final


def assert_same(got: RequestOutput, expected: RequestOutput) -> None:
    assert got.token_ids == expected.token_ids
    assert (got.text, got.reasoning_content, got.content) == (
        expected.text,
        expected.reasoning_content,
        expected.content,
    )
    assert (got.finish_reason, got.usage.completion_tokens, got.usage.reasoning_tokens) == (
        expected.finish_reason,
        expected.usage.completion_tokens,
        expected.usage.reasoning_tokens,
    )


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-r1"])
@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_a_resumed_request_ends_as_the_uninterrupted_one(model, params, make_llm):
    llm = make_llm(model)
    (whole,) = llm.generate([PROMPT], params)
    for cut in (1, 9, 23, 24):
        assert_same(resumed(llm, PROMPT, params, whole.token_ids[:cut]), whole)
    # Seeded draws do not depend on batch mates or on how many steps ran before.
    (again,) = llm.generate([PROMPT], params)
    assert again.token_ids == whole.token_ids


def test_resuming_with_speculative_decoding(make_llm):
    plain = make_llm("tiny-r1-mtp")
    drafting = make_llm("tiny-r1-mtp", num_speculative_tokens=1)
    (whole,) = plain.generate([PROMPT], GREEDY)
    assert_same(resumed(drafting, PROMPT, GREEDY, whole.token_ids[:10]), whole)


def test_the_thinking_budget_and_stop_strings_continue_across_a_resume(make_llm):
    llm = make_llm("tiny-r1")
    prompt = llm.tokenizer.encode_chat([{"role": "user", "content": "What is 2 + 3?"}])
    budget = SamplingParams(temperature=0, max_tokens=20, max_reasoning_tokens=6, ignore_eos=True)
    (whole,) = llm.generate([prompt], budget)
    assert whole.reasoning_content and whole.content  # the budget forced the end of thinking
    for cut in (3, 6, 7, 12):  # before, at, and after the forced end tag
        assert_same(resumed(llm, prompt, budget, whole.token_ids[:cut]), whole)
    plain = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0]
    stop = llm.tokenizer.decode(plain.token_ids[8:10])
    stopping = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop])
    (whole,) = llm.generate([prompt], stopping)
    assert whole.finish_reason == "stop"
    assert_same(resumed(llm, prompt, stopping, whole.token_ids[:4]), whole)


def test_a_checkpoint_at_the_end_finishes_at_once_and_a_bad_one_is_refused(make_llm):
    llm = make_llm("tiny-llama")
    (whole,) = llm.generate([PROMPT], GREEDY)
    assert_same(resumed(llm, PROMPT, GREEDY, whole.token_ids), whole)
    with pytest.raises(RequestRejected, match="more than max_tokens 24"):
        llm.engine.add_request("too-long", PROMPT, GREEDY, output_token_ids=whole.token_ids + [5])
    with pytest.raises(RequestRejected, match="token ids must be integers"):
        llm.engine.add_request("bad-ids", PROMPT, GREEDY, output_token_ids=[10**9])
