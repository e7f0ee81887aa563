"""Sampling: greedy, seeds that reproduce regardless of batch-mates, top-k/top-p, and stop conditions."""

from __future__ import annotations

import pytest
import torch

from ponder.engine import SamplingParams
from ponder.engine.errors import ConfigError
from ponder.engine.runtime.layers.sampler import NUCLEUS_CANDIDATES, Sampler, apply_top_k_top_p

MODEL = "tiny-llama"
PROMPT = list(b"The quick brown fox")


def test_same_seed_same_tokens_alone_or_in_a_batch(make_llm):
    llm = make_llm(MODEL)
    seeded = SamplingParams(temperature=0.9, top_p=0.95, top_k=100, seed=1234, max_tokens=24, ignore_eos=True)
    (alone,) = llm.generate(PROMPT, seeded)
    mates = [SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True)] * 3
    mates.append(SamplingParams(temperature=0.7, seed=99, max_tokens=10, ignore_eos=True))
    batch = llm.generate(
        [list(b"other"), PROMPT, list(b"x" * 40), list(b"hello"), list(b"zz")], [mates[0], seeded, *mates[1:]]
    )
    assert batch[1].token_ids == alone.token_ids
    (again,) = llm.generate(PROMPT, seeded)
    assert again.token_ids == alone.token_ids


def test_different_seeds_differ_and_sampling_is_not_greedy(make_llm):
    llm = make_llm(MODEL)
    outs = llm.generate(
        [PROMPT] * 4,
        [SamplingParams(temperature=1.0, seed=s, max_tokens=24, ignore_eos=True) for s in range(4)],
    )
    assert len({tuple(o.token_ids) for o in outs}) > 1
    (greedy,) = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    assert any(o.token_ids != greedy.token_ids for o in outs)


def test_top_k_one_is_greedy(make_llm):
    llm = make_llm(MODEL)
    (greedy,) = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    (top1,) = llm.generate(PROMPT, SamplingParams(temperature=1.5, top_k=1, seed=5, max_tokens=16, ignore_eos=True))
    assert top1.token_ids == greedy.token_ids


def test_top_k_top_p_masks():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 0.0, 5.0, -1.0]])
    masked = apply_top_k_top_p(logits, top_ks=torch.tensor([2, 4]), top_ps=torch.tensor([1.0, 0.5]))
    assert torch.isinf(masked[0, 2:]).all() and torch.isfinite(masked[0, :2]).all()
    # row 2: token 2 alone holds > 50% of the mass, so it is the whole nucleus
    assert torch.isfinite(masked[1]).tolist() == [False, False, True, False]


def test_sampler_follows_the_distribution():
    probs = torch.tensor([0.1, 0.2, 0.7])
    logits = probs.log().repeat(4000, 1)
    gen = torch.Generator().manual_seed(0)
    ones = torch.ones(4000)
    tokens, _ = Sampler()(logits, ones, ones, torch.full((4000,), 3), [None] * 4000, gen)
    freq = torch.bincount(tokens, minlength=3).float() / 4000
    assert torch.allclose(freq, probs, atol=0.03)


def test_a_nucleus_is_drawn_alike_among_the_best_candidates_or_from_the_vocabulary():
    # 2,000 tokens: row 0 peaked (its top_p 0.9 nucleus, the first 3 tokens, lies among the best
    # NUCLEUS_CANDIDATES: drawn among them), row 1 flat (its nucleus is 1,800 tokens: drawn from the
    # whole vocabulary). Both follow the nucleus renormalised.
    vocab, rows = 2000, 20_000
    assert vocab > NUCLEUS_CANDIDATES
    peaked = torch.full((vocab,), -20.0)
    peaked[:4] = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    flat = torch.zeros(vocab)
    logits = torch.stack([peaked, flat]).repeat_interleave(rows, dim=0)  # [2 * rows, V]
    ones = torch.ones(2 * rows)
    gen = torch.Generator().manual_seed(3)
    tokens, _ = Sampler()(
        logits, ones, torch.full((2 * rows,), 0.9), torch.full((2 * rows,), vocab), [None] * 2 * rows, gen
    )
    freq = torch.bincount(tokens[:rows], minlength=4)[:4].float() / rows
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95, atol=0.015)
    drawn = set(tokens[rows:].tolist())  # about every token of the flat row's nucleus of 1,800
    assert max(drawn) >= NUCLEUS_CANDIDATES and 1500 < len(drawn) <= 1801  # (rank 1,800: 0.9 before it, rounded)


def test_max_tokens_and_stop_token_ids(make_llm):
    llm = make_llm(MODEL)
    (greedy,) = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    assert len(greedy.token_ids) == 20 and greedy.finish_reason == "length"
    stop_at = greedy.token_ids[5]
    first = greedy.token_ids.index(stop_at)
    (stopped,) = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_at]))
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == greedy.token_ids[: first + 1]  # the stop token is the last one generated


def test_eos_ends_generation(make_llm):
    llm = make_llm(MODEL)
    (greedy,) = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    eos = greedy.token_ids[3]
    engine = llm.engine
    original = engine.scheduler.eos_token_ids
    engine.scheduler.eos_token_ids = frozenset({eos})  # as if this token were the model's EOS
    try:
        (out,) = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=20))
    finally:
        engine.scheduler.eos_token_ids = original
    assert out.finish_reason == "stop" and out.token_ids[-1] == eos and len(out.token_ids) <= 4


def test_stop_strings_are_cut_from_the_output(make_llm):
    llm = make_llm("smollm2-135m")
    params = SamplingParams(temperature=0, max_tokens=40)
    (full,) = llm.chat([{"role": "user", "content": "Count from 1 to 20, separated by commas."}], params)
    assert full.text, "the model should answer"
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    (cut,) = llm.chat(
        [{"role": "user", "content": "Count from 1 to 20, separated by commas."}],
        SamplingParams(temperature=0, max_tokens=40, stop=[stop]),
    )
    assert cut.finish_reason == "stop"
    assert stop not in cut.text
    assert full.text.startswith(cut.text) and full.text.find(stop) == len(cut.text)


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": -1},
        {"top_p": 0},
        {"top_p": 1.5},
        {"top_k": 0},
        {"max_tokens": 0},
        {"stop": [""]},
        {"max_reasoning_tokens": -1},
    ],
)
def test_invalid_params_are_rejected(bad):
    with pytest.raises(ConfigError):
        SamplingParams(**bad)
