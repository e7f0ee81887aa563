"""Tensor parallelism on the CPU (gloo, 2 ranks): the same greedy tokens and logits as one rank,
each rank holding about half the weights, sizes that do not split refused, a dead rank reported;
expert parallelism (whole routed experts per rank) likewise, each rank's weight bytes as
ponder/engine/tools/parallel_size.py predicts for `ponder models info --ep` (docs/architecture.md#tensor-parallelism).

Only one tensor-parallel engine lives at a time (the process group is per process): `tp_llm`
closes the previous one before building the next."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from ponder.engine.config import EngineConfig, SamplingParams
from ponder.engine.constraint import Constraint
from ponder.engine.errors import ConfigError, TensorParallelError
from ponder.engine.runtime import LLM
from ponder.engine.runtime.distributed import check_tensor_parallel, ep_enabled, parallel_state
from ponder.engine.runtime.layers.linear import Linear, QKVParallelLinear
from ponder.engine.runtime.layers.moe import FusedExperts
from ponder.engine.tools.checkpoint_tensors import loaded_mtp_tensors, main_tensors
from ponder.engine.tools.parallel_size import parallel_size, rank_bytes
from tests.conftest import TEST_KV_CACHE_BYTES
from tests.engine.test_logprobs import assert_matches as assert_logprobs_match

pytestmark = pytest.mark.slow

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
# Lengths 20, 3 and 37 with a 16-token budget: chunked prefill, decodes sharing steps with chunks.
PROMPTS = [[(7 * i + 3) % 250 + 1 for i in range(20)], [7, 8, 9], list(range(3, 40))]
CHUNKED = {"max_num_batched_tokens": 16, "kv_cache_memory": TEST_KV_CACHE_BYTES}
EP = {"enable_expert_parallel": True}


@pytest.fixture(scope="module")
def tp_llm():
    """tp_llm(model, **config) -> an LLM on 2 ranks, kept until another is asked for."""
    live: dict = {}

    def make(model: str, **config) -> LLM:
        key = (model, tuple(sorted(config.items())))
        if key not in live:
            close_all(live)
            live[key] = LLM(model, tensor_parallel_size=2, **config)
        return live[key]

    yield make
    close_all(live)


def close_all(live: dict) -> None:
    for llm in live.values():
        llm.close()
    live.clear()


def token_ids(llm: LLM, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(prompts, params)]


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-qwen2", "tiny-r1"])
def test_two_ranks_match_one(model, make_llm, tp_llm):
    assert_matches(make_llm(model, **CHUNKED), tp_llm(model, **CHUNKED))


def test_forked_samples_copy_their_blocks_on_every_rank(make_llm, tp_llm):
    # Parallel sampling: each rank holds half the K/V heads, so each does the copy-on-write copies.
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=8, ignore_eos=True, n=3)
    one, two = make_llm("tiny-llama", **CHUNKED), tp_llm("tiny-llama", **CHUNKED)
    (expected,), (got,) = one.generate(PROMPTS[0], params), two.generate(PROMPTS[0], params)
    assert [c.token_ids for c in got.outputs] == [c.token_ids for c in expected.outputs]


def test_constrained_samples_on_two_ranks_match_one_rank(make_llm, tp_llm):
    # Rank 0 samples: it alone holds the matchers and masks the gathered logits; n forked samples
    # each follow the schema, as on one rank.
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "s": {"type": "string", "maxLength": 5}}}
    params = SamplingParams(
        temperature=1.0, seed=5, max_tokens=40, n=3, constraint=Constraint("json_schema", json.dumps(schema))
    )
    one, two = make_llm("tiny-r1", **CHUNKED), tp_llm("tiny-r1", **CHUNKED)
    (expected,), (got,) = one.generate(PROMPTS[:1], params), two.generate(PROMPTS[:1], params)
    assert [c.token_ids for c in got.outputs] == [c.token_ids for c in expected.outputs]
    assert any(c.finish_reason == "stop" and isinstance(json.loads(c.text), dict) for c in got.outputs)


def assert_matches(one: LLM, two: LLM) -> None:
    """Batch with chunked prefill, a prefix-cache hit and the last step's logits: as one rank."""
    assert token_ids(two, PROMPTS) == token_ids(one, PROMPTS)
    # A prefix-cache hit: the third prompt's first two blocks again, with a new tail.
    again = PROMPTS[2][:32] + [11, 12, 13, 14]
    outputs = two.generate([again], GREEDY)
    assert outputs[0].usage.cached_tokens == 32
    assert outputs[0].token_ids == token_ids(one, [again])[0]
    # The last step's logits (every prompt samples its first token in it): rank 0 gathered them all.
    first = SamplingParams(temperature=0, max_tokens=1)
    short = [p[:5] for p in PROMPTS]  # 13 tokens: one step
    token_ids(one, short, first), token_ids(two, short, first)
    logits_one, logits_two = one.engine.model_runner.last_logits, two.engine.model_runner.last_logits
    assert logits_one is not None and logits_two is not None
    assert logits_two.shape == logits_one.shape == (3, one.engine.model_config.vocab_size)
    assert (logits_two - logits_one).abs().max().item() < 1e-4


def test_each_rank_holds_about_half_the_weights(make_llm, tp_llm):
    # tiny-r1: vocab-parallel embedding and head, heads, experts' and MLPs' intermediate split;
    # only norms, the router and the latent projections are replicated.
    one_rank = make_llm("tiny-r1", **CHUNKED).engine.model_runner.rank_weight_bytes
    per_rank = tp_llm("tiny-r1", **CHUNKED).engine.model_runner.rank_weight_bytes
    assert len(one_rank) == 1 and len(per_rank) == 2
    assert all(b <= 0.55 * one_rank[0] for b in per_rank), (per_rank, one_rank)


# FP8 kept on both ranks (their slices whole 128-wide scale blocks: tiny-dsv3-fp8-tp's shapes), with
# whole experts (EP) or experts split along their width, and the FP8 parameters really FP8.
@pytest.mark.parametrize("ep", [False, True], ids=["tp", "ep"])
def test_fp8_weights_kept_on_two_ranks_match_one_rank(ep, make_llm, tp_llm):
    config = {**CHUNKED, "fp8_weights": "keep"}
    two = tp_llm("tiny-dsv3-fp8-tp", **config, **(EP if ep else {}))
    one = make_llm("tiny-dsv3-fp8-tp", **config)
    assert_matches(one, two)
    expert_weights = one.engine.model_runner.model.model.layers[1].mlp.experts.w13
    assert expert_weights.dtype == torch.float8_e4m3fn
    one_rank, per_rank = one.engine.model_runner.rank_weight_bytes, two.engine.model_runner.rank_weight_bytes
    assert all(b <= 0.55 * one_rank[0] for b in per_rank), (per_rank, one_rank)


# tiny-r1-fp8 first, so that tiny-r1's EP engine is still live for the weight-bytes test after.
@pytest.mark.parametrize("model", ["tiny-r1-fp8", "tiny-r1"])
def test_expert_parallel_matches_one_rank(model, make_llm, tp_llm):
    # 16 routed experts, 8 whole on each rank; the shared expert still split along its width.
    # tiny-r1-fp8 dequantised (kept FP8 cannot split q_b_proj into 128-blocks over 2 ranks).
    config = {**CHUNKED, "fp8_weights": "dequantize"} if model.endswith("fp8") else CHUNKED
    two = tp_llm(model, **config, **EP)
    assert_matches(make_llm(model, **config), two)


def test_expert_parallel_ranks_hold_their_experts_whole(make_llm, tp_llm):
    # Each rank: half the routed experts whole, half of everything split, the replicated parts:
    # byte for byte what `ponder models info --ep` (ponder/engine/tools/parallel_size.py) predicts, at fp32.
    one_rank = make_llm("tiny-r1", **CHUNKED).engine.model_runner.rank_weight_bytes
    llm = tp_llm("tiny-r1", **CHUNKED, **EP)
    per_rank, config = llm.engine.model_runner.rank_weight_bytes, llm.engine.model_config
    predicted, _ = rank_bytes(config, list(main_tensors(config)), 2, True, 4, None)
    assert per_rank == predicted
    assert max(per_rank) == parallel_size(config, 2, ep=True, dtype_bytes=4).weight_bytes_per_gpu
    assert rank_bytes(config, list(main_tensors(config)), 1, False, 4, None)[0] == one_rank  # the rule's base
    assert all(b <= 0.55 * one_rank[0] for b in per_rank), (per_rank, one_rank)


def test_speculative_decoding_on_two_ranks_matches_one_rank(make_llm, tp_llm):
    # The MTP layer is split like the model's layers and its passes run on both ranks: greedy tokens
    # as one rank without drafts, and each rank's bytes as ponder/engine/tools/parallel_size.py predicts with it.
    two = tp_llm("tiny-r1-mtp", num_speculative_tokens=2, **CHUNKED)
    assert token_ids(two, PROMPTS) == token_ids(make_llm("tiny-r1-mtp", **CHUNKED), PROMPTS)
    snapshot = two.engine.snapshot()
    assert 0 < snapshot.accepted_tokens < snapshot.draft_tokens
    config = two.engine.model_config
    tensors = list(main_tensors(config)) + loaded_mtp_tensors(config)
    assert two.engine.model_runner.rank_weight_bytes == rank_bytes(config, tensors, 2, False, 4, None)[0]
    assert max(rank_bytes(config, tensors, 2, False, 4, None)[0]) == (
        parallel_size(config, 2, dtype_bytes=4, mtp=True).weight_bytes_per_gpu
    )


def test_expert_parallel_sizes_that_do_not_split_are_refused(make_llm):
    r1 = make_llm("tiny-r1", **CHUNKED).engine.model_config
    six_experts = dataclasses.replace(r1, extra={**r1.extra, "n_routed_experts": 6})
    check_tensor_parallel(six_experts, 2, expert_parallel=True)  # 3 whole experts per rank
    check_tensor_parallel(six_experts, 4)  # plain TP splits their width (128), not their count
    with pytest.raises(ConfigError, match="does not divide n_routed_experts 6 .*whole routed experts"):
        check_tensor_parallel(six_experts, 4, expert_parallel=True)
    with pytest.raises(ConfigError, match="needs a MoE model"):
        LLM("tiny-llama", tensor_parallel_size=2, enable_expert_parallel=True)  # before any rank starts
    with parallel_state(0, 1, expert_parallel=True):  # one rank: a no-op, every expert here
        assert not ep_enabled()
        assert FusedExperts(6, 8, 4).w13.shape[0] == 6


def test_expert_parallel_partial_sums_add_up():
    # Two EP ranks' FusedExperts (no process group: the sum is the all-reduce) equal one rank's;
    # another rank's expert tensors are ignored by the loader hook.
    torch.manual_seed(0)
    experts, hidden, inter = 4, 16, 8
    tensors = {(e, p): torch.randn(inter, hidden) for e in range(experts) for p in ("gate", "up")}
    tensors |= {(e, "down"): torch.randn(hidden, inter) for e in range(experts)}
    x, weights = torch.randn(5, hidden), torch.rand(5, 2)
    ids = torch.tensor([[0, 1], [2, 3], [1, 2], [3, 0], [0, 2]])

    def built(rank: int, size: int, ep: bool) -> FusedExperts:
        with parallel_state(rank, size, expert_parallel=ep):
            layer = FusedExperts(experts, hidden, inter)
        for (e, p), t in tensors.items():
            layer.weight_loader(layer.w2 if p == "down" else layer.w13, t, (e, p))
        return layer

    whole = built(0, 1, False)(x, weights, ids)
    parts = [built(rank, 2, True) for rank in range(2)]
    assert [p.w13.shape[0] for p in parts] == [2, 2] and parts[1].expert_map.tolist() == [-1, -1, 0, 1]
    torch.testing.assert_close(sum(p(x, weights, ids) for p in parts), whole)


# Preemption frees and recomputes a sequence's KV cache on every rank: one model per cache layout,
# MHA with grouped KV heads (tiny-qwen2) and MLA's latent (tiny-r1). Expert parallelism and FP8
# weights change no cache (their engines are matched to one rank above).
@pytest.mark.parametrize("model", ["tiny-qwen2", "tiny-r1"])
def test_preemption_matches_one_rank(model, make_llm, tp_llm):
    # 6 blocks of 16 tokens cannot hold three 30-token prompts growing by 20 tokens each.
    config = {"num_kv_blocks": 6, "max_num_batched_tokens": 64}
    prompts = [[(5 * i + j) % 200 + 1 for i in range(30)] for j in range(3)]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    two, one = tp_llm(model, **config), make_llm(model, **config)
    assert token_ids(two, prompts, params) == token_ids(one, prompts, params)
    assert two.engine.snapshot().preemptions > 0


def test_sizes_that_do_not_split_are_refused():
    with pytest.raises(ConfigError, match="tensor_parallel_size must be >= 1"):
        EngineConfig(tensor_parallel_size=0)
    with pytest.raises(ConfigError, match="does not divide num_attention_heads 6"):
        LLM("tiny-qwen2", tensor_parallel_size=4)  # 6 heads; refused before any rank starts
    with pytest.raises(ConfigError, match="num_key_value_heads 2"):
        LLM("tiny-qwen2", tensor_parallel_size=3)
    # FP8 weights kept: tiny-r1-fp8's per-rank slices (q_b_proj: 2 heads x 48 rows) cut 128-blocks.
    with pytest.raises(ConfigError, match="scale blocks"):
        LLM("tiny-r1-fp8", tensor_parallel_size=2, fp8_weights="keep")


def test_a_dead_rank_is_reported(tp_llm):
    llm = tp_llm("tiny-llama", max_num_batched_tokens=32, kv_cache_memory=16 << 20)
    with pytest.raises(ConfigError, match="already runs in this process"):
        LLM("tiny-llama", tensor_parallel_size=2)  # one process group per process
    assert llm.generate([[1, 2, 3]], GREEDY)[0].token_ids  # the first engine is untouched
    worker = llm.engine.model_runner.workers[0]
    worker.kill()
    worker.join(timeout=10)
    with pytest.raises(TensorParallelError, match="rank 1 exited"):
        llm.generate([[1, 2, 3]], GREEDY)


def test_fewer_kv_heads_than_ranks_are_replicated():
    # 4 query heads, 2 kv heads over 4 ranks: rank r computes query head r and kv head r // 2,
    # exactly the rows of the full q|k|v output it needs (no process group involved).
    torch.manual_seed(0)
    dim, heads, kv_heads, hidden = 8, 4, 2, 16
    weights = {s: torch.randn(n * dim, hidden) for s, n in (("q", heads), ("k", kv_heads), ("v", kv_heads))}
    full = Linear(hidden, (heads + 2 * kv_heads) * dim)
    full.weight.data.copy_(torch.cat(list(weights.values())))
    x = torch.randn(3, hidden)
    q, k, v = full(x).split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    for rank in range(4):
        with parallel_state(rank, 4):
            layer = QKVParallelLinear(hidden, dim, heads, kv_heads)
        for shard, tensor in weights.items():
            layer.weight_loader(layer.weight, tensor, shard)
        head, kv = slice(rank * dim, (rank + 1) * dim), slice(rank // 2 * dim, (rank // 2 + 1) * dim)
        assert torch.allclose(layer(x), torch.cat([q[:, head], k[:, kv], v[:, kv]], dim=-1))


def test_log_probabilities_on_two_ranks_match_transformers(tp_llm, hf_model):
    # Every rank runs the LM head over the scored rows (its vocab slice), rank 0 reduces them.
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    hf = hf_model("tiny-r1")
    for output in tp_llm("tiny-r1", **CHUNKED).generate(PROMPTS, params):
        assert_logprobs_match(hf, output, 3, 2)
