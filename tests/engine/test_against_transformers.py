"""The engine against Hugging Face transformers on the same weights, fp32: prefill logits and greedy
continuations, alone and under every scheduling situation (batching, chunking, prefix hits, preemption)."""

from __future__ import annotations

import pytest
import torch

from ponder.engine import SamplingParams
from ponder.engine.scheduler import ScheduledSequence
from ponder.engine.sequence import Sequence
from ponder.engine.step_plan import plan_step

DEEPSEEK = ["tiny-r1", "tiny-dsv3-noq", "tiny-dsv3-groups", "tiny-dsv3-norope", "tiny-dsv3-dense"]
MODELS = ["tiny-llama", "tiny-qwen2", "smollm2-135m", *DEEPSEEK]
# Random prompts use ordinary tokens only: [first, end) per model (byte-level tinies: the 256 bytes).
TOKEN_RANGE = {"smollm2-135m": (17, 49152), "tiny-r1": (100, 128000), "tiny-r1-fp8": (100, 128000)}
# The FP8 checkpoint is compared with transformers on its dequantised weights.
REFERENCE = {"tiny-r1-fp8": "tiny-r1-fp8-dequantized"}
NEW_TOKENS = 32
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)


def prompts_for(model: str, lengths=(5, 40, 100), seed=0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    first, end = TOKEN_RANGE.get(model, (0, 256))
    return [torch.randint(first, end, (n,), generator=gen).tolist() for n in lengths]


@torch.inference_mode()
def hf_greedy(model, prompt: list[int], n: int = NEW_TOKENS) -> list[int]:
    ids = torch.tensor([prompt])
    # An explicit mask: otherwise generate() takes prompt tokens equal to pad_token_id for padding.
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


@torch.inference_mode()
def engine_prompt_logits(llm, prompt: list[int]) -> torch.Tensor:
    """Logits at every prompt position from one prefill step through the engine's paged path."""
    engine = llm.engine
    seq = Sequence("logits-probe", prompt, SamplingParams())
    assert engine.scheduler.block_manager.ensure_slots(seq, len(prompt))
    try:
        plan = plan_step([ScheduledSequence(seq, len(prompt))])
        plan.logits_indices = list(range(len(prompt)))  # every position's logits, not only the last's
        return engine.model_runner.forward(plan)  # [T, V]
    finally:
        engine.scheduler.block_manager.free(seq)


@pytest.fixture(scope="module")
def model(request) -> str:
    """The model a test runs on. A module-scoped parameter, so pytest runs every test of one model
    before the next model's: its transformers reference and engines are built once, not once per
    test (the session keeps only the last few; smollm2's GGUF takes ~13 s to dequantise)."""
    return request.param


@pytest.fixture(scope="module")
def expected(hf_model):
    """HF's greedy continuation of each test prompt, per model (computed once)."""
    cache = {}

    def get(model: str, prompts: list[list[int]]) -> list[list[int]]:
        reference = hf_model(REFERENCE.get(model, model))
        for p in prompts:
            if (model, tuple(p)) not in cache:  # (setdefault would run generate() every time)
                cache[model, tuple(p)] = hf_greedy(reference, p)
        return [cache[model, tuple(p)] for p in prompts]

    return get


@pytest.mark.parametrize("model", [*MODELS, "tiny-r1-fp8"], indirect=True)
def test_prefill_logits_match(model, make_llm, hf_model):
    llm = make_llm(model)
    for prompt in prompts_for(model):
        with torch.inference_mode():
            reference = hf_model(REFERENCE.get(model, model))(torch.tensor([prompt])).logits[0].float()  # [T, V]
        ours = engine_prompt_logits(llm, prompt)
        diff = (ours - reference).abs().max().item()
        assert diff <= 1e-3, f"{model}: prompt of {len(prompt)} tokens, max |diff| {diff}"


@pytest.mark.parametrize("model", [*MODELS, "tiny-r1-fp8"], indirect=True)
def test_greedy_alone_matches_generate(model, make_llm, expected):
    llm = make_llm(model)
    prompts = prompts_for(model)
    for prompt, want in zip(prompts, expected(model, prompts), strict=True):
        (out,) = llm.generate(prompt, GREEDY)
        assert out.token_ids == want
        assert out.finish_reason == "length" and out.usage.completion_tokens == NEW_TOKENS


@pytest.mark.parametrize("model", MODELS, indirect=True)
def test_batched_mixed_lengths(model, make_llm, expected):
    prompts = prompts_for(model, lengths=(100, 5, 63, 17, 40))
    outs = make_llm(model).generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == expected(model, prompts)


@pytest.mark.parametrize("model", MODELS, indirect=True)
def test_chunked_prefill(model, make_llm, expected):
    llm = make_llm(model, max_num_batched_tokens=16)  # smaller than two of the prompts
    prompts = prompts_for(model)
    outs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == expected(model, prompts)


@pytest.mark.parametrize("model", MODELS, indirect=True)
def test_prefix_cache_hit(model, make_llm, expected):
    llm = make_llm(model, enable_prefix_caching=True)
    shared, first_tail, second_tail = prompts_for(model, lengths=(80, 9, 12), seed=7)
    first, second = shared + first_tail, shared + second_tail
    (out_first,) = llm.generate(first, GREEDY)
    (out_second,) = llm.generate(second, GREEDY)
    assert out_second.usage.cached_tokens == 80  # five full blocks of 16
    assert [out_first.token_ids, out_second.token_ids] == expected(model, [first, second])


@pytest.mark.parametrize("model", MODELS, indirect=True)
def test_preemption_under_a_small_cache(model, make_llm, expected):
    # 12 blocks of 16 hold the three prompts, not their continuations: someone must be preempted.
    llm = make_llm(model, num_kv_blocks=12)
    prompts = prompts_for(model)
    outs = llm.generate(prompts, GREEDY)
    assert sum(o.metrics.num_preemptions for o in outs) > 0
    assert [o.token_ids for o in outs] == expected(model, prompts)
