"""DeepSeek-V3 `noaux_tc` grouped top-k routing as one kernel, one program per token.

The choice uses the biased scores (score + correction bias): each group is ranked by the sum of
its two best biased scores, the best `topk_groups` groups are kept, and the top-k experts among
them are taken. The gate weights are the unbiased scores of the chosen experts, renormalised
(optional) and scaled. Ties go to the lower index (torch.topk leaves them unspecified).

Dimension legend: T tokens, X experts, G groups, X/G experts per group, k experts per token,
BX, BG the power-of-two paddings of X and G.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _grouped_topk_kernel(
    scores_ptr,  # [T, X] fp32 sigmoid scores
    bias_ptr,  # [X] correction bias
    weights_ptr,  # [T, k] fp32
    ids_ptr,  # [T, k] int32
    stride_st,
    scaling,
    NUM_EXPERTS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,  # X/G
    NUM_GROUPS: tl.constexpr,
    TOPK_GROUPS: tl.constexpr,
    TOP_K: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    BLOCK_X: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    experts = tl.arange(0, BLOCK_X)  # [BX]
    valid = experts < NUM_EXPERTS
    scores = tl.load(scores_ptr + token * stride_st + experts, mask=valid, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + experts, mask=valid, other=0.0).to(tl.float32)
    biased = tl.where(valid, scores + bias, float("-inf"))  # [BX]

    # Group scores: the experts laid out as a [BG, BX] matrix, row g holding group g's experts.
    groups = tl.arange(0, BLOCK_G)  # [BG]
    member = (experts[None, :] // GROUP_SIZE == groups[:, None]) & valid[None, :]  # [BG, BX]
    grid = tl.where(member, biased[None, :], float("-inf"))  # [BG, BX]
    best = tl.max(grid, axis=1)  # [BG]
    group_scores = best
    if GROUP_SIZE > 1:  # plus the second best: drop the (first) best and take the max again
        first = tl.argmax(grid, axis=1)  # [BG]
        second = tl.max(tl.where(experts[None, :] == first[:, None], float("-inf"), grid), axis=1)
        group_scores = best + second
    group_scores = tl.where(groups < NUM_GROUPS, group_scores, float("-inf"))

    kept = tl.zeros([BLOCK_G], dtype=tl.int1)
    for _ in tl.static_range(TOPK_GROUPS):
        g = tl.argmax(group_scores, axis=0)
        kept = kept | (groups == g)
        group_scores = tl.where(groups == g, float("-inf"), group_scores)
    eligible = tl.max((member & kept[:, None]).to(tl.int32), axis=0) > 0  # [BX]
    choice = tl.where(eligible, biased, float("-inf"))  # [BX]

    slots = tl.arange(0, BLOCK_K)  # [BK]
    ids = tl.zeros([BLOCK_K], dtype=tl.int32)
    weights = tl.zeros([BLOCK_K], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        e = tl.argmax(choice, axis=0)
        weight = tl.sum(tl.where(experts == e, scores, 0.0), axis=0)  # the unbiased score
        ids = tl.where(slots == j, e, ids)
        weights = tl.where(slots == j, weight, weights)
        choice = tl.where(experts == e, float("-inf"), choice)
    if RENORMALIZE:
        weights = weights / (tl.sum(weights, axis=0) + 1e-20)
    weights = weights * scaling
    slot_ok = slots < TOP_K
    tl.store(weights_ptr + token * TOP_K + slots, weights, mask=slot_ok)
    tl.store(ids_ptr + token * TOP_K + slots, ids, mask=slot_ok)


def grouped_topk(
    scores: torch.Tensor,  # [T, X] sigmoid router scores, fp32
    correction_bias: torch.Tensor,  # [X] added for the choice only
    top_k: int,
    num_groups: int,
    topk_groups: int,
    renormalize: bool,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # weights [T, k] fp32, expert ids [T, k] int64
    num_tokens, num_experts = scores.shape
    group_size = num_experts // num_groups
    assert num_experts % num_groups == 0 and 0 < topk_groups <= num_groups, (num_experts, num_groups, topk_groups)
    assert 0 < top_k <= topk_groups * group_size, (top_k, topk_groups, group_size)
    assert correction_bias.shape == (num_experts,) and scores.stride(-1) == 1
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=scores.device)  # [T, k]
    ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=scores.device)  # [T, k]
    if num_tokens > 0:
        _grouped_topk_kernel[(num_tokens,)](
            scores,
            correction_bias,
            weights,
            ids,
            scores.stride(0),
            scaling,
            NUM_EXPERTS=num_experts,
            GROUP_SIZE=group_size,
            NUM_GROUPS=num_groups,
            TOPK_GROUPS=topk_groups,
            TOP_K=top_k,
            RENORMALIZE=renormalize,
            BLOCK_X=triton.next_power_of_2(num_experts),
            BLOCK_G=triton.next_power_of_2(num_groups),
            BLOCK_K=triton.next_power_of_2(top_k),
        )
    return weights, ids.long()
