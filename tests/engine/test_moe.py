"""DeepSeekMoE routing and expert computation: hand-checked router cases, the router against
transformers' DeepseekV3TopkRouter, and the by-expert batched experts against a per-token loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ponder import kernels


def route(scores, bias, top_k, groups, topk_groups, scaling=2.5):
    weights, ids = kernels.grouped_topk(
        torch.tensor([scores]), torch.tensor(bias), top_k, groups, topk_groups, True, scaling
    )
    order = ids[0].argsort()
    return ids[0][order].tolist(), weights[0][order]


def test_bias_changes_the_choice_but_not_the_gate_weights():
    scores = [0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.6, 0.4]
    ids, weights = route(scores, [0.0] * 8, top_k=2, groups=1, topk_groups=1)
    assert ids == [0, 2]
    bias = [0.0] * 8
    bias[4] = 0.5  # expert 4 now outranks expert 2 for the choice (1.2 > 0.8)
    ids, weights = route(scores, bias, top_k=2, groups=1, topk_groups=1)
    assert ids == [0, 4]
    # The weights are the unbiased scores 0.9 and 0.7, normalised, times the scaling factor.
    torch.testing.assert_close(weights, torch.tensor([0.9 / 1.6, 0.7 / 1.6]) * 2.5)


def test_group_limit_excludes_a_high_scoring_expert():
    # Four groups of two. Group scores (sum of the top two): 0.95, 1.15, 0.97, 0.2 -> keep groups 1 and 2.
    scores = [0.95, 0.0, 0.6, 0.55, 0.52, 0.45, 0.1, 0.1]
    ids, weights = route(scores, [0.0] * 8, top_k=2, groups=4, topk_groups=2)
    assert ids == [2, 3]  # expert 0 has the best score of all, but its group is out
    torch.testing.assert_close(weights, torch.tensor([0.6 / 1.15, 0.55 / 1.15]) * 2.5)
    ids, _ = route(scores, [0.0] * 8, top_k=2, groups=1, topk_groups=1)
    assert ids == [0, 2]  # without groups it would have been chosen


def test_router_matches_transformers():
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    from ponder.engine.config import ModelConfig
    from ponder.engine.runtime.layers.moe import GroupedTopKRouter

    fields = dict(hidden_size=32, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2)
    fields.update(routed_scaling_factor=2.5, norm_topk_prob=True)
    hf = DeepseekV3TopkRouter(DeepseekV3Config(**fields))
    config = ModelConfig.from_dict(
        {
            "model_type": "deepseek_v3",
            "vocab_size": 8,
            "intermediate_size": 8,
            "num_hidden_layers": 1,
            "num_attention_heads": 1,
            **fields,
        }
    )
    ours = GroupedTopKRouter(config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(16, 32, generator=gen))
        hf.e_score_correction_bias.copy_(0.3 * torch.randn(16, generator=gen))
        ours.weight.copy_(hf.weight)
        ours.e_score_correction_bias.copy_(hf.e_score_correction_bias)
    x = torch.randn(50, 32, generator=gen)
    _, hf_weights, hf_ids = hf(x)
    weights, ids = ours(x)
    hf_order, order = hf_ids.argsort(dim=1), ids.argsort(dim=1)
    assert torch.equal(ids.gather(1, order), hf_ids.gather(1, hf_order))
    torch.testing.assert_close(weights.gather(1, order), hf_weights.gather(1, hf_order))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_batched_by_expert_equal_a_per_token_loop(dtype):
    gen = torch.Generator().manual_seed(3)
    tokens, hidden, inter, experts, top_k = 37, 24, 16, 8, 3
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden**0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, generator=gen) / inter**0.5).to(dtype)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=gen)
    out = kernels.fused_moe(x, w13, w2, weights, ids)
    expected = torch.zeros(tokens, hidden)
    for t in range(tokens):
        for k in range(top_k):
            gate, up = F.linear(x[t].float(), w13[ids[t, k]].float()).chunk(2)
            expected[t] += weights[t, k] * F.linear(F.silu(gate) * up, w2[ids[t, k]].float())
    tolerance = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(out.float(), expected, atol=tolerance, rtol=tolerance)
