"""The full sampler's parameters (ponder/engine/runtime/layers/logits_processors.py, min_p in
sampler.py): greedy tokens identical to transformers' generate() with the matching logits processor,
alone and batched with requests using other parameters; each forked sample penalised by its own
tokens; speculative decoding unchanged; min_tokens against EOS, stop tokens and stop strings;
min_p's kept tokens as MinPLogitsWarper's; the ranges refused."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
)

from ponder.engine import SamplingParams
from ponder.engine.detokenizer import IncrementalDetokenizer
from ponder.engine.errors import ConfigError, RequestRejected
from ponder.engine.runtime.layers.logits_processors import apply_logits_processors, drafts_before, token_counts
from ponder.engine.runtime.layers.sampler import apply_min_p
from ponder.engine.sequence import Sequence
from tests.conftest import TEST_KV_CACHE_BYTES
from tests.engine.test_against_transformers import prompts_for
from tests.engine.test_detokenizer import feed_one_by_one, tiny_tokenizer

MODELS = ["smollm2-135m", "tiny-qwen2"]
NEW_TOKENS = 12
BIASED_TOKEN = 42  # an ordinary token in both vocabularies


class OpenAIPenalties(LogitsProcessor):
    """OpenAI's frequency and presence penalties over the generated tokens only (transformers has none)."""

    def __init__(self, prompt_length: int, frequency: float = 0.0, presence: float = 0.0) -> None:
        self.prompt_length, self.frequency, self.presence = prompt_length, frequency, presence

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        output = input_ids[:, self.prompt_length :]
        counts = torch.zeros_like(scores).scatter_add_(1, output, torch.ones_like(output, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0)


def sequence_bias(bias: dict[int, float]) -> SequenceBiasLogitsProcessor:
    return SequenceBiasLogitsProcessor([[[token], value] for token, value in bias.items()])


def case(name: str, plain: list[int]) -> tuple[dict, Callable[[list[int]], list]]:
    """(SamplingParams fields, prompt -> transformers processors) of one parameter; `plain` is the
    unpenalised greedy continuation (the bias bans its first token, so it must change)."""
    bias = {plain[0]: -100.0, BIASED_TOKEN: 3.5}
    return {
        "repetition_penalty": ({"repetition_penalty": 1.3}, lambda p: [RepetitionPenaltyLogitsProcessor(1.3)]),
        "frequency_penalty": ({"frequency_penalty": 1.5}, lambda p: [OpenAIPenalties(len(p), frequency=1.5)]),
        "presence_penalty": ({"presence_penalty": 1.5}, lambda p: [OpenAIPenalties(len(p), presence=1.5)]),
        "negative_penalties": (
            {"frequency_penalty": -2.0, "presence_penalty": 0.5},
            lambda p: [OpenAIPenalties(len(p), frequency=-2.0, presence=0.5)],
        ),
        "logit_bias": ({"logit_bias": bias}, lambda p: [sequence_bias(bias)]),
    }[name]


CASES = ["repetition_penalty", "frequency_penalty", "presence_penalty", "negative_penalties", "logit_bias"]


def greedy(**fields) -> SamplingParams:
    return SamplingParams(**{"temperature": 0, "max_tokens": NEW_TOKENS, "ignore_eos": True, **fields})


@torch.inference_mode()
def hf_processed(model, prompt: list[int], processors: list, n: int = NEW_TOKENS) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n,
        do_sample=False,
        pad_token_id=0,
        logits_processor=LogitsProcessorList(processors),
    )
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def model(request) -> str:
    """Module-scoped, so that each model's tests run together (its engine and reference built once)."""
    return request.param


@pytest.fixture(scope="module")
def references(hf_model):
    """references(model, prompt, case name, plain) -> (fields, transformers' tokens), computed once."""
    cache: dict = {}

    def get(model: str, prompt: list[int], name: str, plain: list[int]) -> tuple[dict, list[int]]:
        fields, processors = case(name, plain)
        key = (model, tuple(prompt), name)
        if key not in cache:
            cache[key] = hf_processed(hf_model(model), prompt, processors(prompt))
        return fields, cache[key]

    return get


@pytest.mark.parametrize("model", MODELS, indirect=True)
@pytest.mark.parametrize("name", CASES)
def test_greedy_tokens_match_transformers_processors(model, name, make_llm, references):
    llm = make_llm(model)
    changed = []
    for prompt in prompts_for(model, lengths=(5, 40)):
        (plain,) = llm.generate(prompt, greedy())
        fields, want = references(model, prompt, name, plain.token_ids)
        (out,) = llm.generate(prompt, greedy(**fields))
        assert out.token_ids == want, (model, name, len(prompt))
        changed.append(out.token_ids != plain.token_ids)
    assert any(changed)  # the parameter matters here: the test can fail
    if name == "logit_bias":  # the raw logits stay the model's (log probabilities read them)
        assert llm.engine.model_runner.last_logits[0, plain.token_ids[0]] > -50


@pytest.mark.parametrize("model", MODELS, indirect=True)
def test_batched_requests_each_get_their_own_processors(model, make_llm, references):
    llm = make_llm(model)
    prompts = prompts_for(model, lengths=(5, 40))
    plains = [o.token_ids for o in llm.generate(prompts, greedy())]
    batch_prompts, batch_params, wants = [], [], []
    for prompt, plain in zip(prompts, plains, strict=True):
        for name in CASES:
            fields, want = references(model, prompt, name, plain)
            batch_prompts.append(prompt)
            batch_params.append(greedy(**fields))
            wants.append(want)
        batch_prompts.append(prompt)  # and one with none of them
        batch_params.append(greedy())
        wants.append(plain)
    outs = llm.generate(batch_prompts, batch_params)
    assert [o.token_ids for o in outs] == wants


@pytest.mark.parametrize("model", MODELS, indirect=True)
def test_min_tokens_masks_eos_as_transformers_does(model, make_llm, hf_model):
    llm = make_llm(model)
    eos = sorted(llm.engine.scheduler.eos_token_ids)
    bias = {token: 100.0 for token in eos}  # EOS is every step's greedy choice
    prompt = prompts_for(model, lengths=(40,))[0]
    (early,) = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, logit_bias=bias))
    assert (len(early.token_ids), early.finish_reason) == (1, "stop")
    (held,) = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, logit_bias=bias, min_tokens=5))
    # Five tokens before EOS may come (transformers' and vLLM's min_tokens): EOS is the sixth.
    processors = [sequence_bias(bias), MinNewTokensLengthLogitsProcessor(len(prompt), 5, eos)]
    assert held.token_ids == hf_processed(hf_model(model), prompt, processors, n=6)
    assert (len(held.token_ids), held.finish_reason, held.token_ids[-1] in eos) == (6, "stop", True)
    assert not set(held.token_ids[:5]) & set(eos)


def test_min_tokens_masks_stop_token_ids(make_llm):
    llm = make_llm("tiny-llama")
    stop_token = 120
    params = greedy(logit_bias={stop_token: 100.0}, stop_token_ids=[stop_token], min_tokens=3)
    (out,) = llm.generate(list(b"The quick brown fox"), params)
    assert len(out.token_ids) == 4 and out.token_ids[-1] == stop_token and stop_token not in out.token_ids[:-1]


def test_stop_strings_do_not_end_a_sample_before_min_tokens(make_llm):
    # The bias makes every token "a" (the byte tokeniser's id 97): the stop string "a" ends the
    # sample at its first token, or, with min_tokens=5, at the fifth (it completes again there).
    llm = make_llm("tiny-llama")
    prompt = list(b"The quick brown fox")
    (first,) = llm.generate(prompt, greedy(logit_bias={97: 100.0}, stop=["a"]))
    assert (first.token_ids, first.text, first.finish_reason) == ([97], "", "stop")
    (fifth,) = llm.generate(prompt, greedy(logit_bias={97: 100.0}, stop=["a"], min_tokens=5))
    assert (fifth.token_ids, fifth.text, fifth.finish_reason) == ([97] * 5, "aaaa", "stop")
    (longer,) = llm.generate(prompt, greedy(logit_bias={97: 100.0}, stop=["aaa"], min_tokens=2))
    assert (longer.token_ids, longer.text) == ([97] * 3, "")  # completed by token 3 >= 2: counts


def test_the_detokenizer_ignores_stop_strings_completed_before_min_tokens():
    ids = list(b"ab STOP cd STOP ef")  # the first STOP completes at token 7, the second at token 15
    for min_tokens, text in ((0, "ab "), (7, "ab "), (8, "ab STOP cd "), (16, "ab STOP cd STOP ef")):
        detok = IncrementalDetokenizer(tiny_tokenizer(), [65], stop=["STOP", "x"], min_tokens=min_tokens)
        assert "".join(feed_one_by_one(detok, ids)) == text == detok.text, min_tokens


def test_each_forked_sample_is_penalised_by_its_own_tokens(make_llm):
    # Sample i of an n=2 request draws what an n=1 request with sample_index=i draws: also with
    # penalties, whose counts are each sample's own (shared counts would make the samples differ).
    llm = make_llm("tiny-qwen2")
    prompt = prompts_for("tiny-qwen2", lengths=(20,))[0]
    fields = {"temperature": 0.8, "seed": 11, "max_tokens": NEW_TOKENS, "ignore_eos": True}
    penalties = {"repetition_penalty": 1.4, "frequency_penalty": 1.0, "presence_penalty": 0.5, "logit_bias": {7: 2.0}}
    (forked,) = llm.generate(prompt, SamplingParams(n=2, **fields, **penalties))
    singles = llm.generate([prompt] * 2, [SamplingParams(sample_index=i, **fields, **penalties) for i in (0, 1)])
    assert [c.token_ids for c in forked.outputs] == [s.token_ids for s in singles]
    assert forked.outputs[0].token_ids != forked.outputs[1].token_ids
    (unpenalised,) = llm.generate(prompt, SamplingParams(n=2, **fields))
    assert [c.token_ids for c in unpenalised.outputs] != [c.token_ids for c in forked.outputs]


@pytest.mark.slow
def test_speculative_decoding_keeps_the_penalised_greedy_tokens(make_llm):
    # A row verifying draft j counts the drafts before it; greedy tokens equal the plain engine's.
    settings = {"max_num_batched_tokens": 16, "kv_cache_memory": TEST_KV_CACHE_BYTES}  # test_speculative's
    prompts = [[(7 * i + 3) % 900 + 1 for i in range(20)], list(range(300, 337)), [7, 8, 9]]
    # (repetition_penalty 0.5 favours repeats, drafts' included: with k = 2, rows that left the
    # drafts out of their history would choose other tokens here.)
    params = [
        greedy(repetition_penalty=1.3, frequency_penalty=0.7, presence_penalty=0.4, logit_bias={500: 3.0}),
        greedy(frequency_penalty=1.5, min_tokens=4),
        greedy(repetition_penalty=0.5),
    ]
    plain = make_llm("tiny-r1-mtp", **settings)
    batch = [(prompt, p) for prompt in prompts for p in params]
    want = [o.token_ids for o in plain.generate([b[0] for b in batch], [b[1] for b in batch])]
    assert want[::3] != [o.token_ids for o in plain.generate(prompts, greedy())]
    for k in (1, 2):
        llm = make_llm("tiny-r1-mtp", num_speculative_tokens=k, **settings)
        before = llm.engine.snapshot()
        assert [o.token_ids for o in llm.generate([b[0] for b in batch], [b[1] for b in batch])] == want
        after = llm.engine.snapshot()
        assert after.accepted_tokens > before.accepted_tokens  # drafts stood, so rows counted them


def test_rows_count_the_drafts_before_them_and_the_logits_stay():
    # One output token (3) so far; rows verify drafts 4 and 5, then the bonus row. Repetition 2 over
    # prompt + output halves seen logits; frequency 1 subtracts output counts; min_tokens 3 masks
    # EOS (8) and the stop token (9) in the rows with fewer than 3 output tokens before them.
    params = SamplingParams(frequency_penalty=1.0, repetition_penalty=2.0, min_tokens=3, stop_token_ids=[9])
    seq = Sequence("r", [1, 2], params)
    seq.token_ids.append(3)
    logits = torch.ones(3, 10)
    out = apply_logits_processors(logits, [seq] * 3, [0, 0, 0], [4, 5, -1], eos_token_ids=[8])
    inf = float("inf")
    assert out.tolist() == [
        [1, 0.5, 0.5, -0.5, 1, 1, 1, 1, -inf, -inf],
        [1, 0.5, 0.5, -0.5, -0.5, 1, 1, 1, -inf, -inf],
        [1, 0.5, 0.5, -0.5, -0.5, -0.5, 1, 1, 1, 1],
    ]
    assert torch.equal(logits, torch.ones(3, 10))  # the model's logits are left as they were
    plain = Sequence("p", [1, 2], SamplingParams())
    assert apply_logits_processors(logits, [plain], [0], [-1], [8]) is logits  # nothing to do: no copy


def test_drafts_before_each_row():
    # Item 0 verifies drafts 5, 6 (rows 0-2); item 1 forks (rows 3-4); item 2 decodes (row 5).
    rows = drafts_before([0, 0, 0, 1, 1, 2], [5, 6, -1, -1, -1, -1])
    assert rows == [[], [5], [5, 6], [], [], []]


def test_token_counts_by_one_scatter():
    counts = token_counts([[3, 1, 3], [], [0]], vocab=4)
    assert counts.tolist() == [[0, 1, 0, 2], [0, 0, 0, 0], [1, 0, 0, 0]]


@pytest.mark.parametrize("min_p", [0.0, 0.05, 0.3, 0.9, 1.0])
def test_min_p_keeps_what_transformers_keeps(min_p):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 300, generator=gen) * 3 / torch.tensor([0.5, 0.7, 1.0, 1.3, 2.0, 1.0])[:, None]
    logits[5, :4] = 10.0  # a tie at the top
    ours = apply_min_p(logits, torch.full((6,), min_p))
    theirs = MinPLogitsWarper(min_p)(None, logits.clone()) if min_p else logits
    assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs))
    assert torch.equal(ours[torch.isfinite(ours)], logits[torch.isfinite(ours)])
    mixed = apply_min_p(logits, torch.tensor([0.0, min_p, 0.0, min_p, 0.0, min_p]))  # per row
    assert torch.isfinite(mixed[0]).all() and torch.equal(mixed[1], ours[1])


def test_min_p_sampling_is_seeded_and_min_p_one_is_greedy(make_llm):
    llm = make_llm("tiny-llama")
    prompt = list(b"The quick brown fox")
    seeded = SamplingParams(temperature=1.0, min_p=0.2, seed=3, max_tokens=NEW_TOKENS, ignore_eos=True)
    (alone,) = llm.generate(prompt, seeded)
    batch = llm.generate([list(b"other"), prompt], [SamplingParams(temperature=1.0, max_tokens=8), seeded])
    assert batch[1].token_ids == alone.token_ids
    (plain,) = llm.generate(prompt, greedy())
    (only_top,) = llm.generate(prompt, SamplingParams(temperature=1.5, min_p=1.0, seed=3, max_tokens=NEW_TOKENS))
    assert only_top.token_ids == plain.token_ids[: len(only_top.token_ids)]


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"frequency_penalty": 2.5}, "frequency_penalty must be in"),
        ({"presence_penalty": -2.1}, "presence_penalty must be in"),
        ({"frequency_penalty": float("nan")}, "frequency_penalty must be in"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty must be > 0"),
        ({"min_p": 1.5}, "min_p must be in"),
        ({"min_p": -0.1}, "min_p must be in"),
        ({"min_tokens": -1}, "min_tokens must be"),
        ({"min_tokens": 17}, "min_tokens must be"),  # above max_tokens (16)
        ({"logit_bias": {5: 101}}, "logit_bias of token 5"),
        ({"logit_bias": {5: "x"}}, "logit_bias of token 5"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias keys must be token ids"),
        ({"logit_bias": {"5": 1.0}}, "logit_bias keys must be token ids"),
    ],
)
def test_out_of_range_values_are_refused(fields, message):
    with pytest.raises(ConfigError, match=message):
        SamplingParams(**fields)


def test_defaults_are_off():
    params = SamplingParams()
    assert (params.frequency_penalty, params.presence_penalty, params.repetition_penalty) == (0, 0, 1)
    assert (params.logit_bias, params.min_p, params.min_tokens) == ({}, 0, 0)
    assert SamplingParams(logit_bias=None).logit_bias == {}


def test_a_logit_bias_outside_the_vocabulary_is_refused_when_added(make_llm):
    engine = make_llm("tiny-llama").engine
    with pytest.raises(RequestRejected, match="logit_bias token id 320 is outside the vocabulary"):
        engine.add_request("bad-bias", [1, 2, 3], SamplingParams(logit_bias={3: 1.0, 320: 1.0}))
    assert "bad-bias" not in engine.output_processor.states
