"""Speculative decoding with DeepSeek-V3's MTP layer (docs/architecture.md#speculative-decoding):
greedy tokens identical to decoding without it (batched, chunked prefill, prefix hits, preemption,
stop strings, thinking budget, k = 1 and 2), sampled tokens from the same distribution (the
sampler's rule exactly, and the engine's tokens by a chi-squared test), acceptance reported per
request and in the engine's totals.

tiny-r1-mtp's MTP layer is built so that about half of its drafts are right (ponder/engine/tools/tiny/weights.py
deepseek_weights), so both acceptance and rejection happen often."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from ponder.engine.config import EngineConfig, ModelConfig, SamplingParams
from ponder.engine.errors import ConfigError
from ponder.engine.model_store import resolve_model
from ponder.engine.runtime import LLM
from ponder.engine.runtime.layers.sampler import Sampler
from tests.conftest import TEST_KV_CACHE_BYTES

pytestmark = pytest.mark.slow

MODEL = "tiny-r1-mtp"
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
# Lengths 20, 3, 37 and a repeat of the third's first 32 tokens (a prefix hit once it is cached).
PROMPTS = [
    [(7 * i + 3) % 900 + 1 for i in range(20)],
    [7, 8, 9],
    list(range(300, 337)),
    [*range(300, 332), 11, 12, 13],
]
CHUNKED = {"max_num_batched_tokens": 16, "kv_cache_memory": TEST_KV_CACHE_BYTES}


def token_ids(llm: LLM, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(prompts, params)]


@pytest.fixture(scope="module")
def plain(make_llm) -> list[list[int]]:
    """Greedy tokens of PROMPTS without speculation, one by one then batched (the same)."""
    llm = make_llm(MODEL, **CHUNKED)
    return token_ids(llm, PROMPTS)


@pytest.mark.parametrize("k", [1, 2])
def test_greedy_tokens_are_identical_with_speculation(k, plain, make_llm):
    llm = make_llm(MODEL, num_speculative_tokens=k, **CHUNKED)
    before = llm.engine.snapshot()
    outputs = llm.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outputs] == plain
    after = llm.engine.snapshot()
    drafted, accepted = after.draft_tokens - before.draft_tokens, after.accepted_tokens - before.accepted_tokens
    # Non-trivial both ways: many drafts stand, many fall (so both paths of the rule ran).
    assert 0.2 < accepted / drafted < 0.9, (accepted, drafted)
    # The same counts per request; fewer steps than tokens.
    assert sum(o.metrics.num_draft_tokens for o in outputs) == drafted
    assert sum(o.metrics.num_accepted_tokens for o in outputs) == accepted
    assert all(o.metrics.draft_acceptance_rate is not None for o in outputs)
    assert after.steps - before.steps < GREEDY.max_tokens * len(PROMPTS)


def test_prefix_hit_and_preemption_keep_the_tokens(plain, make_llm):
    # 7 blocks of 16 tokens for four sequences of up to 61 tokens (13 blocks): sequences are preempted and
    # recomputed (drafts dropped, the MTP layer's cache refilled); the fourth prompt hits the third's prefix.
    llm = make_llm(MODEL, num_speculative_tokens=1, num_kv_blocks=7, max_num_batched_tokens=16)
    outputs = llm.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outputs] == plain
    assert llm.engine.snapshot().preemptions > 0
    again = llm.generate([PROMPTS[3]], GREEDY)[0]
    assert again.usage.cached_tokens == 32 and again.token_ids == plain[3]


def test_a_stop_string_inside_accepted_drafts_ends_the_request_there(make_llm):
    # Stop at the text of the 6th greedy token: without speculation the request ends at that token;
    # with it, the step that reached it may have accepted tokens after it, which are dropped.
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    for prompt in PROMPTS[:3]:
        plain = make_llm(MODEL, **CHUNKED)
        stop = plain.tokenizer.decode([plain.generate([prompt], params)[0].token_ids[5]])
        if not stop.strip():
            continue
        with_stop = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop])
        expected = plain.generate([prompt], with_stop)[0]
        got = make_llm(MODEL, num_speculative_tokens=2, **CHUNKED).generate([prompt], with_stop)[0]
        assert (got.token_ids, got.text, got.finish_reason) == (
            expected.token_ids,
            expected.text,
            expected.finish_reason,
        )
        assert got.finish_reason == "stop"


def test_thinking_budget_and_max_tokens_end_where_one_token_steps_end(make_llm):
    # R1's chat template opens <think>: after 5 reasoning tokens the end tag is forced; drafts never
    # run past the budget or max_tokens.
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    for params in (
        SamplingParams(temperature=0, max_tokens=20, max_reasoning_tokens=5, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=7, ignore_eos=True),
    ):
        expected = make_llm(MODEL, **CHUNKED).chat(messages, params)[0]
        got = make_llm(MODEL, num_speculative_tokens=2, **CHUNKED).chat(messages, params)[0]
        assert got.token_ids == expected.token_ids
        assert (got.reasoning_content, got.content) == (expected.reasoning_content, expected.content)
        assert got.usage == expected.usage


def test_the_rule_keeps_the_target_distribution_exactly():
    # One target distribution p over 4 tokens, the draft 2 (p = 0.3) in every row: accepted in about
    # 30% of rows, and every row's token distributed as p, for temperature 1 and with top-k.
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    rows = 40_000
    logits = p.log().repeat(rows, 1)
    gen = torch.Generator().manual_seed(0)
    ones = torch.ones(rows)
    drafts = torch.full((rows,), 2)
    tokens, accepted = Sampler()(logits, ones, ones, torch.full((rows,), 4), [None] * rows, gen, drafts)
    assert abs(accepted.float().mean().item() - 0.3) < 0.01
    assert torch.allclose(torch.bincount(tokens, minlength=4) / rows, p, atol=0.01)
    # top-k 2 keeps {2: 3/7, 3: 4/7}; a draft outside the top-k (token 0) is never accepted.
    tokens, accepted = Sampler()(logits, ones, ones, torch.full((rows,), 2), [None] * rows, gen, drafts * 0)
    assert not accepted.any()
    assert torch.allclose(torch.bincount(tokens, minlength=4) / rows, torch.tensor([0, 0, 3 / 7, 4 / 7]), atol=0.01)
    # Greedy rows accept exactly the argmax, and otherwise give the argmax.
    zeros = torch.zeros(2)
    pair = p.log().repeat(2, 1)
    tokens, accepted = Sampler()(pair, zeros, torch.ones(2), torch.full((2,), 4), [None] * 2, gen, torch.tensor([3, 1]))
    assert tokens.tolist() == [3, 3] and accepted.tolist() == [True, False]


def test_sampled_tokens_follow_the_same_distribution(make_llm):
    # 800 samples of a 3-token continuation (temperature 1, top-k 4) with and without speculation:
    # each position's token counts pass a chi-squared test of one distribution (p > 0.001; a wrong
    # rule, e.g. keeping every draft or sampling the residual with the draft left in, fails it).
    prompt = PROMPTS[0]
    params = SamplingParams(temperature=1.0, top_k=4, max_tokens=3, ignore_eos=True)
    n = 800
    samples = {}
    for k in (0, 1):
        llm = make_llm(MODEL, num_speculative_tokens=k, max_num_seqs=256, kv_cache_memory=TEST_KV_CACHE_BYTES)
        samples[k] = token_ids(llm, [prompt] * n, params)
        if k:
            snap = llm.engine.snapshot()
            assert snap.accepted_tokens > 0.1 * snap.draft_tokens
    for position in range(3):
        counts = [Counter(s[position] for s in samples[k]) for k in (0, 1)]
        assert chi_squared_p_value(*counts) > 0.001, (position, counts)


def chi_squared_p_value(a: Counter, b: Counter) -> float:
    """p-value of the chi-squared test that two samples' counts come from one distribution."""
    keys = sorted(set(a) | set(b))
    table = torch.tensor([[a[k] for k in keys], [b[k] for k in keys]], dtype=torch.float64)
    expected = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / table.sum()
    statistic = ((table - expected) ** 2 / expected).sum()
    dof = len(keys) - 1
    if dof == 0:
        return 1.0
    return torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), statistic / 2).item()


def test_speculation_is_off_by_default_on_the_cpu_and_needs_an_mtp_layer():
    r1 = ModelConfig.from_pretrained(resolve_model(MODEL))
    llama = ModelConfig.from_pretrained(resolve_model("tiny-llama"))
    assert r1.num_mtp_layers == 1 and llama.num_mtp_layers == 0
    assert EngineConfig().speculative_tokens(r1) == 0
    assert EngineConfig(device="cuda").speculative_tokens(r1) == 1
    assert EngineConfig(device="cuda").speculative_tokens(llama) == 0
    assert EngineConfig(num_speculative_tokens=3).speculative_tokens(r1) == 3
    with pytest.raises(ConfigError, match="needs a model with an MTP layer"):
        EngineConfig(num_speculative_tokens=1).speculative_tokens(llama)
    with pytest.raises(ConfigError, match="num_speculative_tokens must be >= 0"):
        EngineConfig(num_speculative_tokens=-1)


def test_the_mtp_layer_is_loaded_only_for_speculation(make_llm):
    from safetensors import safe_open

    path = resolve_model(MODEL)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        eh_proj = f.get_tensor("model.layers.4.eh_proj.weight").float()
    with_mtp = make_llm(MODEL, num_speculative_tokens=1, **CHUNKED).engine.model_runner.model
    assert torch.equal(with_mtp.mtp.eh_proj.weight, eh_proj)
    assert make_llm(MODEL, **CHUNKED).engine.model_runner.model.mtp is None


def test_the_benchmark_reports_acceptance_and_both_rates():
    # benchmarks/engine_throughput.py --model tiny-moe --speculative, at a small size: both runs in
    # one process, identical greedy tokens, a non-trivial acceptance rate.
    root = Path(__file__).resolve().parents[2]
    args = ["--model", "tiny-moe", "--speculative", "--requests", "4", "--max-prompt", "40", "--output-tokens", "12"]
    run = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "engine_throughput.py"), *args],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = run.stdout.strip().splitlines()[-1]
    assert result.startswith("RESULT engine_throughput_speculative model=tiny-moe k=1 ")
    fields = dict(field.split("=", 1) for field in result.split()[2:])
    assert fields["identical"] == "4/4"
    assert 0.1 < float(fields["acceptance"]) < 1
    assert float(fields["plain_tok_s"]) > 0 and float(fields["speculative_tok_s"]) > 0


def test_log_probabilities_are_the_target_models(make_llm):
    # Each verifying row's logits are the model's own: the values of drafted tokens that stood are
    # the model's, exactly those of decoding without speculation.
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2, prompt_logprobs=1)
    plain = make_llm(MODEL, **CHUNKED).generate(PROMPTS, params)
    drafted = make_llm(MODEL, num_speculative_tokens=2, **CHUNKED).generate(PROMPTS, params)
    assert sum(o.metrics.num_accepted_tokens for o in drafted) > 0
    for want, got in zip(plain, drafted, strict=True):
        assert got.token_ids == want.token_ids and len(got.logprobs) == len(want.logprobs)
        ours_all, theirs_all = [*got.logprobs, *got.prompt_logprobs[1:]], [*want.logprobs, *want.prompt_logprobs[1:]]
        for ours, theirs in zip(ours_all, theirs_all, strict=True):
            assert [t for t, _ in ours.top] == [t for t, _ in theirs.top]
            assert abs(ours.logprob - theirs.logprob) <= 1e-4
            assert abs(ours.rank - theirs.rank) <= 2  # deep in the vocabulary values differ by ~1e-6 (ties)
