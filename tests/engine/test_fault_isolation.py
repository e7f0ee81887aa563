"""One request must not be able to fail its batch neighbours (issue: `top_k=10**29` once passed
validation, overflowed when the sampler built its int64 tensor, and the engine host then failed
every request in flight). Parameters the sampling tensors cannot hold are refused when the request
is added; a fault inside a step is narrowed down to the request causing it, which fails alone
(finish reason `error`) while the others' tokens are those of an undisturbed run."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ponder.engine.config import SamplingParams
from ponder.engine.errors import ConfigError, RequestRejected
from ponder.engine.runtime import LLM
from tests.conftest import TEST_KV_CACHE_BYTES

MODEL = "tiny-llama"
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPTS = [[5, 6, 7, 8], [9, 10, 11], list(range(20, 40)), [3, 1, 4, 1, 5, 9]]


@pytest.fixture(scope="module")
def llm():
    return LLM(MODEL, kv_cache_memory=TEST_KV_CACHE_BYTES)


@pytest.fixture(scope="module")
def undisturbed(llm) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]


def run(llm: LLM, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict:
    """Add every request (those refused at once map to their RequestRejected), step to the end."""
    results: dict = {}
    engine = llm.engine
    for request_id, (prompt, params) in requests.items():
        try:
            engine.add_request(request_id, prompt, params)
        except RequestRejected as e:
            results[request_id] = e
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                results[output.request_id] = output
    return results


def test_a_request_that_faults_in_a_step_fails_alone(llm, undisturbed, monkeypatch):
    # Sampling raises whenever the poisoned request's row is in the batch, as the int64 overflow did.
    real_sample = llm.engine.model_runner.sample

    def sample(logits, seqs, *rows):
        if any(seq.request_id == "poison" for seq in seqs):
            raise RuntimeError("Overflow when unpacking long")
        return real_sample(logits, seqs, *rows)

    monkeypatch.setattr(llm.engine.model_runner, "sample", sample)
    requests = {f"ok-{i}": (prompt, GREEDY) for i, prompt in enumerate(PROMPTS)}
    requests["poison"] = ([12, 13, 14], GREEDY)
    results = run(llm, requests)
    poison = results.pop("poison")
    assert poison.finished and poison.finish_reason == "error"
    assert poison.error == "RuntimeError: Overflow when unpacking long"
    assert [results[f"ok-{i}"].token_ids for i in range(len(PROMPTS))] == undisturbed
    assert all(results[f"ok-{i}"].finish_reason == "length" for i in range(len(PROMPTS)))
    assert not llm.engine.scheduler.has_unfinished()
    assert llm.engine.scheduler.block_manager.num_free_blocks == llm.engine.scheduler.block_manager.num_blocks


def test_a_fault_in_one_sample_fails_its_request_whole(llm, undisturbed, monkeypatch):
    # Sample 1 of a forked request faults once it decodes; the halving runs sample 2 after the
    # request has failed (nothing left to run for it), and sample 0 before (its tokens are dropped).
    real_sample = llm.engine.model_runner.sample

    def sample(logits, seqs, *rows):
        if any(seq.request_id == "poison" and seq.index == 1 for seq in seqs):
            raise RuntimeError("bad sample")
        return real_sample(logits, seqs, *rows)

    monkeypatch.setattr(llm.engine.model_runner, "sample", sample)
    requests = {f"ok-{i}": (prompt, GREEDY) for i, prompt in enumerate(PROMPTS)}
    requests["poison"] = ([12, 13, 14], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, n=3))
    results = run(llm, requests)
    poison = results.pop("poison")
    assert poison.error == "RuntimeError: bad sample"
    assert [c.finish_reason for c in poison.outputs] == ["error"] * 3
    assert [len(c.token_ids) for c in poison.outputs] == [1, 1, 1]  # the fork's first tokens
    assert [results[f"ok-{i}"].token_ids for i in range(len(PROMPTS))] == undisturbed
    assert llm.engine.scheduler.block_manager.num_free_blocks == llm.engine.scheduler.block_manager.num_blocks


def test_top_k_beyond_the_vocabulary_is_off_and_a_huge_seed_is_refused_alone(llm, undisturbed):
    huge_top_k = SamplingParams(temperature=1.0, top_k=10**29, seed=1, max_tokens=8, ignore_eos=True)
    vocab = llm.engine.model_config.vocab_size
    vocab_top_k = SamplingParams(temperature=1.0, top_k=vocab, seed=1, max_tokens=8, ignore_eos=True)
    results = run(llm, {"huge": ([5, 6, 7], huge_top_k), "ok": (PROMPTS[0], GREEDY)})
    assert results["ok"].token_ids == undisturbed[0]
    same = run(llm, {"vocab": ([5, 6, 7], vocab_top_k)})
    assert results["huge"].token_ids == same["vocab"].token_ids  # top_k >= vocab: every token kept
    with pytest.raises(ConfigError, match="seed must fit in 64 bits"):
        SamplingParams(seed=2**70)


@st.composite
def sampling_params(draw) -> SamplingParams | None:
    """Any parameters a caller of the engine could pass; None where SamplingParams refuses them."""
    fields = {
        "temperature": draw(st.one_of(st.floats(allow_nan=True), st.sampled_from([0.0, 0.7, 1.0]))),
        "top_p": draw(st.one_of(st.floats(min_value=-1, max_value=2), st.just(float("nan")))),
        "top_k": draw(st.one_of(st.integers(-2, 50), st.integers(min_value=2**31, max_value=10**30))),
        "seed": draw(st.one_of(st.none(), st.integers(min_value=-(2**70), max_value=2**70))),
        "max_tokens": draw(st.integers(-1, 12)),
        "stop": draw(st.lists(st.text(min_size=0, max_size=3), max_size=2)),
        "stop_token_ids": draw(st.lists(st.integers(-(2**70), 2**70), max_size=3)),
        "max_reasoning_tokens": draw(st.one_of(st.none(), st.integers(-1, 10))),
        "ignore_eos": draw(st.booleans()),
    }
    try:
        return SamplingParams(**fields)
    except ConfigError:
        return None


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(params=sampling_params(), prompt=st.lists(st.integers(0, 400), min_size=1, max_size=12))
def test_random_sampling_parameters_never_fail_a_neighbour(llm, undisturbed, params, prompt):
    requests = {"neighbour": (PROMPTS[2], GREEDY)}
    if params is not None:
        requests["random"] = (prompt, params)
    results = run(llm, requests)
    neighbour = results["neighbour"]
    assert neighbour.finish_reason == "length" and neighbour.token_ids == undisturbed[2]
    if params is not None:
        random = results["random"]
        assert isinstance(random, RequestRejected) or random.finish_reason in ("stop", "length", "error")
