"""Log probabilities (docs/architecture.md#log-probabilities) against transformers on the same weights,
fp32: every sampled token's value, rank and top-k, and every prompt token's (`prompt_logprobs`), equal
log_softmax of transformers' logits within 1e-4, alone and batched, through chunked prefill, a prefix
hit, preemption, forks, the thinking budget's forced tag, stop strings and resumption. (Two ranks:
tests/engine/test_tensor_parallel.py; speculative decoding: tests/engine/test_speculative.py.)"""

from __future__ import annotations

import pytest
import torch

from ponder.engine import SamplingParams
from ponder.engine.errors import ConfigError
from ponder.engine.outputs import TokenLogprob
from ponder.engine.runtime import logprobs as logprobs_module
from tests.engine.test_against_transformers import REFERENCE, prompts_for

TOLERANCE = 1e-4
GREEDY = {"temperature": 0, "max_tokens": 8, "ignore_eos": True}


@torch.inference_mode()
def reference_logprobs(hf, token_ids: list[int]) -> torch.Tensor:
    """[T, V]: row p - 1 is the distribution the token at position p was drawn from."""
    return hf(torch.tensor([token_ids])).logits[0].float().log_softmax(dim=-1)


def assert_value(value: TokenLogprob, row: torch.Tensor, token: int, k: int) -> None:
    """One token's value, rank and k alternatives against the reference row [V] (ties aside)."""
    want = row[token].item()
    assert value.token_id == token
    assert value.logprob is not None and abs(value.logprob - want) <= TOLERANCE, (value.logprob, want)
    assert value.rank is not None
    assert int((row > want + TOLERANCE).sum()) + 1 <= value.rank <= int((row > want - TOLERANCE).sum()) + 1
    best = row.topk(k).values.tolist()
    assert len(value.top) == k
    for (alternative, logprob), reference_value in zip(value.top, best, strict=True):
        assert abs(logprob - reference_value) <= TOLERANCE  # the same order of values...
        assert abs(row[alternative].item() - logprob) <= TOLERANCE  # ...each the id's own


def assert_matches(hf, output, k: int | None = 5, prompt_k: int | None = None) -> None:
    """A finished request's sample values (k alternatives; None: not asked) and prompt values
    (prompt_k; None: not asked) against transformers."""
    prompt = output.prompt_token_ids
    for sample in output.outputs:
        tokens = [*prompt, *sample.token_ids]
        reference = reference_logprobs(hf, tokens)
        if k is None:
            assert sample.logprobs is None
        else:
            assert sample.logprobs is not None and len(sample.logprobs) == len(sample.token_ids)
            for i, value in enumerate(sample.logprobs):
                assert_value(value, reference[len(prompt) + i - 1], tokens[len(prompt) + i], k)
        if prompt_k is not None:
            assert output.prompt_logprobs is not None and len(output.prompt_logprobs) == len(prompt)
            assert output.prompt_logprobs[0] is None
            for position, value in enumerate(output.prompt_logprobs[1:], start=1):
                assert value is not None
                assert_value(value, reference[position - 1], prompt[position], prompt_k)


@pytest.fixture(scope="module")
def model(request) -> str:
    return request.param


@pytest.mark.parametrize("model", ["smollm2-135m", "tiny-qwen2", "tiny-r1"], indirect=True)
def test_sampled_and_prompt_values_alone_and_batched(model, make_llm, hf_model):
    llm, hf = make_llm(model), hf_model(REFERENCE.get(model, model))
    short, long, other = prompts_for(model, lengths=(5, 40, 23), seed=3)
    wanted = SamplingParams(**GREEDY, logprobs=5, prompt_logprobs=3)
    (alone,) = llm.generate(long, wanted)
    assert_matches(hf, alone, 5, 3)
    plain = SamplingParams(**GREEDY)  # a neighbour that wants none
    batched = llm.generate([short, other, long], [wanted, plain, SamplingParams(**GREEDY, logprobs=0)])
    assert_matches(hf, batched[0], 5, 3)
    assert batched[1].logprobs is None and batched[1].prompt_logprobs is None
    assert_matches(hf, batched[2], 0)
    assert batched[2].prompt_logprobs is None
    assert batched[2].token_ids == alone.token_ids  # greedy: the values changed nothing


@pytest.mark.parametrize("model", ["tiny-qwen2", "tiny-r1"], indirect=True)
def test_chunked_prefill_scores_every_prompt_position(model, make_llm, hf_model):
    llm, hf = make_llm(model, max_num_batched_tokens=16), hf_model(model)
    prompts = prompts_for(model, lengths=(40, 5, 23), seed=4)
    outputs = llm.generate(prompts, SamplingParams(**GREEDY, logprobs=2, prompt_logprobs=4))
    for output in outputs:
        assert_matches(hf, output, 2, 4)


@pytest.mark.parametrize("model", ["tiny-qwen2", "tiny-r1"], indirect=True)
def test_a_prefix_hit_loses_no_prompt_value(model, make_llm, hf_model):
    llm, hf = make_llm(model, enable_prefix_caching=True), hf_model(model)
    (prompt,) = prompts_for(model, lengths=(50,), seed=5)
    llm.generate(prompt, SamplingParams(**GREEDY))  # caches the prompt's three full blocks
    (echoed,) = llm.generate(prompt, SamplingParams(**GREEDY, prompt_logprobs=1))
    assert echoed.usage.cached_tokens == 0  # the hit is passed by: its positions compute no logits
    assert_matches(hf, echoed, None, 1)
    (generated,) = llm.generate(prompt, SamplingParams(**GREEDY, logprobs=1))
    assert generated.usage.cached_tokens == 48  # values of sampled tokens only: the hit stands
    assert_matches(hf, generated, 1)


@pytest.mark.parametrize("model", ["tiny-qwen2", "tiny-r1"], indirect=True)
def test_preempted_requests_keep_their_values(model, make_llm, hf_model):
    llm, hf = make_llm(model, num_kv_blocks=12), hf_model(model)  # the three cannot all finish at once
    prompts = prompts_for(model)
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=3))
    assert sum(o.metrics.num_preemptions for o in outputs) > 0
    for output in outputs:
        assert_matches(hf, output, 3)


def test_each_forked_sample_has_its_own_values(make_llm, hf_model):
    llm, hf = make_llm("tiny-qwen2"), hf_model("tiny-qwen2")
    (prompt,) = prompts_for("tiny-qwen2", lengths=(12,), seed=6)
    (output,) = llm.generate(prompt, SamplingParams(n=3, seed=11, max_tokens=10, ignore_eos=True, logprobs=2))
    assert len({tuple(s.token_ids) for s in output.outputs}) > 1  # the samples differ...
    assert_matches(hf, output, 2)  # ...and each has the values of its own tokens


def test_values_stream_with_their_tokens_and_the_forced_tag_is_scored(make_llm, hf_model):
    # R1's template opens <think>; after 3 reasoning tokens the end tag is forced. Its tokens were
    # not sampled: the step that computes them scores them, and they are sent then, with values.
    llm, hf = make_llm("tiny-r1"), hf_model("tiny-r1")
    params = SamplingParams(temperature=0, max_tokens=12, max_reasoning_tokens=3, ignore_eos=True, logprobs=2)
    prompt = llm.tokenizer.encode_chat([{"role": "user", "content": "What is 2 + 3?"}])
    llm.engine.add_request("streamed", prompt, params)
    streamed_tokens, streamed_values, final = [], [], None
    while llm.engine.has_unfinished_requests():
        for output in llm.engine.step():
            assert output.new_logprobs is not None
            assert [v.token_id for v in output.new_logprobs] == output.new_token_ids
            streamed_tokens += output.new_token_ids
            streamed_values += output.new_logprobs
            final = output if output.finished else final
    assert final is not None and streamed_tokens == final.token_ids and streamed_values == final.logprobs
    assert "</think>" in llm.tokenizer.decode(final.token_ids, skip_special_tokens=False)
    assert_matches(hf, final, 2)


def test_a_tag_forced_at_max_tokens_has_no_value(make_llm, hf_model):
    # The budget forces the tag at the 3rd token and max_tokens ends the sample inside it: the
    # model never ran those tokens, so they carry no value (logprob None), and the others do.
    llm, hf = make_llm("tiny-r1"), hf_model("tiny-r1")
    params = SamplingParams(temperature=0, max_tokens=4, max_reasoning_tokens=3, ignore_eos=True, logprobs=1)
    (output,) = llm.chat([{"role": "user", "content": "What is 2 + 3?"}], params)
    assert output.logprobs is not None and len(output.logprobs) == len(output.token_ids) == 4
    assert [v.logprob is None for v in output.logprobs] == [False, False, False, True]
    reference = reference_logprobs(hf, [*output.prompt_token_ids, *output.token_ids])
    for i, value in enumerate(output.logprobs[:3]):
        assert_value(value, reference[len(output.prompt_token_ids) + i - 1], output.token_ids[i], 1)


def test_a_stop_string_cuts_the_values_with_the_tokens(make_llm):
    llm = make_llm("tiny-qwen2")
    (prompt,) = prompts_for("tiny-qwen2", lengths=(9,), seed=8)
    (free,) = llm.generate(prompt, SamplingParams(**GREEDY, logprobs=1))
    stop = free.text[len(free.text) // 2 :][:2]
    (stopped,) = llm.generate(prompt, SamplingParams(**GREEDY, logprobs=1, stop=[stop]))
    assert stopped.finish_reason == "stop" and len(stopped.token_ids) < len(free.token_ids)
    assert stopped.logprobs == free.logprobs[: len(stopped.token_ids)]


def test_a_resumed_request_keeps_the_values_it_came_with(make_llm, hf_model):
    llm, hf = make_llm("tiny-qwen2"), hf_model("tiny-qwen2")
    (prompt,) = prompts_for("tiny-qwen2", lengths=(10,), seed=9)
    params = SamplingParams(**GREEDY, logprobs=1)
    (whole,) = llm.generate(prompt, params)
    # The values the earlier run stored, marked so that a recomputation would show.
    stored = [TokenLogprob(v.token_id, -1.0 - i, 7) for i, v in enumerate(whole.logprobs[:3])]
    llm.engine.add_request("kept", prompt, params, output_token_ids=whole.token_ids[:3], output_logprobs=stored)
    llm.engine.add_request("scored", prompt, params, output_token_ids=whole.token_ids[:3])  # none stored
    finished = {}
    while llm.engine.has_unfinished_requests():
        finished |= {o.request_id: o for o in llm.engine.step() if o.finished}
    kept = finished["kept"]
    assert kept.token_ids == whole.token_ids and kept.logprobs[:3] == stored
    for value, first_run in zip(kept.logprobs[3:], whole.logprobs[3:], strict=True):
        assert abs(value.logprob - first_run.logprob) <= TOLERANCE
    assert_matches(hf, finished["scored"], 1)  # computed again by the prefill


def test_a_long_prompt_is_scored_a_chunk_of_rows_at_a_time(make_llm, monkeypatch):
    llm = make_llm("tiny-qwen2")
    model = llm.engine.model_runner.model
    vocab = llm.engine.model_config.vocab_size
    rows_per_call: list[int] = []

    def counting(hidden: torch.Tensor):
        rows_per_call.append(hidden.shape[0])
        return type(model).compute_logits(model, hidden)

    (prompt,) = prompts_for("tiny-qwen2", lengths=(60,), seed=10)
    (whole,) = llm.generate(prompt, SamplingParams(**GREEDY, prompt_logprobs=2))
    monkeypatch.setattr(logprobs_module, "SCORE_CHUNK_FLOATS", 8 * vocab)  # 8 rows of logits at a time
    monkeypatch.setattr(model, "compute_logits", counting)
    (chunked,) = llm.generate(prompt, SamplingParams(**GREEDY, prompt_logprobs=2))
    assert max(rows_per_call) == 8 and sum(r for r in rows_per_call if r == 8) >= 56
    assert chunked.prompt_logprobs == whole.prompt_logprobs


@pytest.mark.parametrize("field", ["logprobs", "prompt_logprobs"])
@pytest.mark.parametrize("value", [-1, 21, 2.5])
def test_alternatives_outside_0_to_20_are_refused(field, value):
    with pytest.raises(ConfigError, match=field):
        SamplingParams(**{field: value})
