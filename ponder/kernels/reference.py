"""Pure-torch references of the hot ops. They are the CPU implementation and the ground truth that
the Triton kernels are tested against.

Dimension legend: T tokens in the step, B sequences, H query heads, K kv heads, G = H/K,
D head dim, N cache blocks, S block size, M blocks per sequence, L = M*S context positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def store_kvcache(
    key: torch.Tensor,  # [T, K, D]
    value: torch.Tensor,  # [T, K, D]
    k_cache: torch.Tensor,  # [N, S, K, D]
    v_cache: torch.Tensor,  # [N, S, K, D]
    slot_mapping: torch.Tensor,  # [T] int64, block * S + offset; -1 = skip
) -> None:
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, key)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, value)


def gather_paged(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """[N, S, K, D] cache, [B, M] tables -> [B, K, L, D] per-sequence contexts."""
    batch, blocks = block_tables.shape
    gathered = cache[block_tables]  # [B, M, S, K, D]
    return gathered.view(batch, blocks * cache.shape[1], *cache.shape[2:]).transpose(1, 2)


def paged_decode_attention(
    query: torch.Tensor,  # [B, H, D], one token per sequence
    k_cache: torch.Tensor,  # [N, S, K, D]
    v_cache: torch.Tensor,  # [N, S, K, D]
    block_tables: torch.Tensor,  # [B, M] int64
    context_lens: torch.Tensor,  # [B] int64, including the new token
    scale: float,
) -> torch.Tensor:  # [B, H, D]
    batch, num_heads, head_dim = query.shape
    num_kv_heads = k_cache.shape[2]
    keys = gather_paged(k_cache, block_tables)  # [B, K, L, D]
    values = gather_paged(v_cache, block_tables)
    # GQA without repeating K/V: the G query heads of a kv head act as G query rows.
    q = query.view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)  # [B, K, G, D]
    positions = torch.arange(keys.shape[2], device=query.device)
    mask = (positions[None, :] < context_lens[:, None])[:, None, None, :]  # [B, 1, 1, L]
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)  # [B, K, G, D]
    return out.reshape(batch, num_heads, head_dim)


@dataclass
class PrefillPlan:
    """Index maps and the attention bias of a prefill batch. They depend only on the step's
    layout, so the model computes them once per step and every layer reuses them."""

    seq_index: torch.Tensor  # [T] sequence of each token
    row: torch.Tensor  # [T] its row among its sequence's new tokens
    bias: torch.Tensor  # [B, 1, G*Q, L] 0 where visible, -inf elsewhere
    max_query_len: int


def prefill_plan(
    query_start_loc: torch.Tensor,  # [B+1]
    context_lens: torch.Tensor,  # [B] cached prefix + new tokens
    max_query_len: int,
    groups: int,
    context_width: int,  # L: block table width * block size
    dtype: torch.dtype,
) -> PrefillPlan:
    device = query_start_loc.device
    batch = context_lens.shape[0]
    query_lens = query_start_loc[1:] - query_start_loc[:-1]  # [B]
    seq_index = torch.repeat_interleave(torch.arange(batch, device=device), query_lens)  # [T]
    row = torch.arange(int(query_start_loc[-1]), device=device) - query_start_loc[seq_index]  # [T]
    # Query row i of a sequence sits at position prefix + i and sees keys 0..prefix + i.
    rows = torch.arange(max_query_len, device=device)
    last_key = (context_lens - query_lens)[:, None] + rows[None, :]  # [B, Q]
    last_key = torch.where(rows[None, :] < query_lens[:, None], last_key, 0)  # padding rows: key 0 only
    visible = torch.arange(context_width, device=device)[None, None, :] <= last_key[:, :, None]  # [B, Q, L]
    bias = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill_(~visible, float("-inf"))
    bias = bias[:, None].expand(batch, groups, max_query_len, context_width)
    return PrefillPlan(seq_index, row, bias.reshape(batch, 1, groups * max_query_len, context_width), max_query_len)


def paged_prefill_attention(
    query: torch.Tensor,  # [T, H, D], the sequences' new tokens back to back
    k_cache: torch.Tensor,  # [N, S, K, D], already holding the new tokens' K/V
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, M]
    query_start_loc: torch.Tensor,  # [B+1] int64
    context_lens: torch.Tensor,  # [B] cached prefix + new tokens
    max_query_len: int,
    scale: float,
    plan: PrefillPlan | None = None,
) -> torch.Tensor:  # [T, H, D]
    num_tokens, num_heads, head_dim = query.shape
    batch, blocks = block_tables.shape
    num_kv_heads = k_cache.shape[2]
    groups = num_heads // num_kv_heads
    if plan is None:
        plan = prefill_plan(
            query_start_loc, context_lens, max_query_len, groups, blocks * k_cache.shape[1], query.dtype
        )
    padded = query.new_zeros(batch, max_query_len, num_heads, head_dim)
    padded[plan.seq_index, plan.row] = query
    # [B, Q, K, G, D] -> [B, K, G*Q, D]: GQA groups become extra query rows, K/V are not repeated
    q = padded.view(batch, max_query_len, num_kv_heads, groups, head_dim).permute(0, 2, 3, 1, 4)
    q = q.reshape(batch, num_kv_heads, groups * max_query_len, head_dim)
    keys = gather_paged(k_cache, block_tables)  # [B, K, L, D]
    values = gather_paged(v_cache, block_tables)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=plan.bias, scale=scale)  # [B, K, G*Q, D]
    out = out.view(batch, num_kv_heads, groups, max_query_len, head_dim).permute(0, 3, 1, 2, 4)
    return out.reshape(batch, max_query_len, num_heads, head_dim)[plan.seq_index, plan.row]


def paged_mla_prefill(
    query: torch.Tensor,  # [T, H, C + R]: absorbed q_nope (W_UK^T q) | roped q_pe
    cache: torch.Tensor,  # [N, S, C + R], already holding the new tokens' latents
    block_tables: torch.Tensor,  # [B, M]
    query_start_loc: torch.Tensor,  # [B+1] int64
    context_lens: torch.Tensor,  # [B] cached prefix + new tokens
    max_query_len: int,
    kv_lora_rank: int,  # C
    scale: float,
) -> torch.Tensor:  # [T, H, C]: attention-weighted latents (W_UV is applied by the caller)
    """MLA prefill with absorbed weights: causal paged prefill with one kv head, the latent row,
    whose first C entries are the value (its rope tail is attended and dropped)."""
    latents = cache.unsqueeze(2)  # [N, S, 1, C + R]
    out = paged_prefill_attention(
        query, latents, latents, block_tables, query_start_loc, context_lens, max_query_len, scale
    )
    return out[..., :kv_lora_rank]


def store_latent_cache(
    latent: torch.Tensor,  # [T, C + R]: normed c_KV | roped k_pe
    cache: torch.Tensor,  # [N, S, C + R]
    slot_mapping: torch.Tensor,  # [T] int64; -1 = skip
) -> None:
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        latent, slot_mapping = latent[keep], slot_mapping[keep]
    cache.view(-1, cache.shape[-1]).index_copy_(0, slot_mapping, latent)


def paged_mla_decode(
    query: torch.Tensor,  # [B, H, C + R]: absorbed q_nope (W_UK^T q) | roped q_pe
    cache: torch.Tensor,  # [N, S, C + R]
    block_tables: torch.Tensor,  # [B, M]
    context_lens: torch.Tensor,  # [B], including the new token
    kv_lora_rank: int,  # C
    scale: float,
) -> torch.Tensor:  # [B, H, C]: attention-weighted latents (W_UV is applied by the caller)
    """MLA decode with absorbed weights: one shared latent "head" for all query heads (MQA), keys
    are the whole cached row, values its first C entries."""
    batch, blocks = block_tables.shape
    latents = cache[block_tables].view(batch, 1, blocks * cache.shape[1], cache.shape[-1])  # [B, 1, L, C+R]
    positions = torch.arange(latents.shape[2], device=query.device)
    mask = (positions[None, :] < context_lens[:, None])[:, None, None, :]  # [B, 1, 1, L]
    # The H query heads act as H query rows against the single latent head.
    out = F.scaled_dot_product_attention(
        query.unsqueeze(1), latents, latents[..., :kv_lora_rank], attn_mask=mask, scale=scale
    )  # [B, 1, H, C]
    return out.squeeze(1)


def grouped_topk(
    scores: torch.Tensor,  # [T, E] sigmoid router scores, fp32
    correction_bias: torch.Tensor,  # [E] added for the choice only
    top_k: int,
    num_groups: int,
    topk_groups: int,
    renormalize: bool,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # weights [T, k] fp32, expert ids [T, k] int64
    """DeepSeek-V3's `noaux_tc` routing: groups ranked by the sum of their two best biased scores,
    the best `topk_groups` groups kept, the top-k experts chosen among them by biased score; the
    gate weights are the unbiased scores of the chosen experts (normalised, then scaled)."""
    num_tokens, num_experts = scores.shape
    biased = scores + correction_bias  # [T, E]
    grouped = biased.view(num_tokens, num_groups, num_experts // num_groups)  # [T, G, E/G]
    group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)  # [T, G]
    kept_groups = group_scores.topk(topk_groups, dim=-1).indices  # [T, g]
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept_groups, True)  # [T, G]
    expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(num_tokens, num_experts)  # [T, E]
    topk_ids = biased.masked_fill(~expert_mask, float("-inf")).topk(top_k, dim=-1).indices  # [T, k]
    weights = scores.gather(1, topk_ids)  # [T, k]
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scaling, topk_ids


def fused_moe(
    x: torch.Tensor,  # [T, E_h] hidden states
    w13: torch.Tensor,  # [X, 2I, E_h] gate|up of every expert
    w2: torch.Tensor,  # [X, E_h, I] down of every expert
    topk_weights: torch.Tensor,  # [T, k]
    topk_ids: torch.Tensor,  # [T, k]
    expert_map: torch.Tensor | None = None,  # [X_global] global id -> local id, -1 = not here (EP)
) -> torch.Tensor:  # [T, E_h] = sum_k weight_k * expert_k(x)
    """Routed experts, batched by expert: the (token, choice) pairs are sorted by expert so each
    expert runs one matmul over all of its tokens; the loop runs over experts, never tokens.
    With `expert_map` the ids are global and w13/w2 hold only this rank's experts: pairs whose
    expert maps to -1 contribute nothing (expert parallelism's partial sum)."""

    def expert_mlp(expert: int, xs: torch.Tensor) -> torch.Tensor:  # [n, E_h] -> [n, E_h]
        return F.linear(silu_and_mul(F.linear(xs, w13[expert])), w2[expert])

    return _by_expert(x, topk_weights, topk_ids, w13.shape[0], expert_mlp, expert_map)


def fused_moe_fp8(
    x: torch.Tensor,  # [T, E_h] hidden states
    w13: torch.Tensor,  # [X, 2I, E_h] float8_e4m3fn gate|up of every expert
    w13_scale_inv: torch.Tensor,  # [X, 2*ceil(I/128), ceil(E_h/128)] gate's block rows, then up's
    w2: torch.Tensor,  # [X, E_h, I] float8_e4m3fn down of every expert
    w2_scale_inv: torch.Tensor,  # [X, ceil(E_h/128), ceil(I/128)]
    topk_weights: torch.Tensor,  # [T, k]
    topk_ids: torch.Tensor,  # [T, k]
    linear=None,  # the fp8_linear to use (default: this module's reference)
    expert_map: torch.Tensor | None = None,  # [X_global] -> local id or -1, as in fused_moe
) -> torch.Tensor:  # [T, E_h]
    """`fused_moe` with block-scaled FP8 experts: each expert's tokens run through fp8_linear."""
    linear = linear or fp8_linear
    inter = w2.shape[2]
    inter_blocks = w13_scale_inv.shape[1] // 2
    aligned = inter % 128 == 0  # gate|up scales tile the stacked rows: one GEMM for both

    def expert_mlp(expert: int, xs: torch.Tensor) -> torch.Tensor:  # [n, E_h] -> [n, E_h]
        w, s = w13[expert], w13_scale_inv[expert]
        if aligned:
            gate_up = linear(xs, w, s)  # [n, 2I]
        else:
            gate_up = torch.cat([linear(xs, w[:inter], s[:inter_blocks]), linear(xs, w[inter:], s[inter_blocks:])], -1)
        return linear(silu_and_mul(gate_up).contiguous(), w2[expert], w2_scale_inv[expert])

    return _by_expert(x, topk_weights, topk_ids, w13.shape[0], expert_mlp, expert_map)


def _by_expert(
    x: torch.Tensor,  # [T, E_h]
    topk_weights: torch.Tensor,  # [T, k]
    topk_ids: torch.Tensor,  # [T, k]
    num_experts: int,
    expert_mlp,  # (expert, [n, E_h] tokens) -> [n, E_h]
    expert_map: torch.Tensor | None = None,  # [X_global] -> local id, -1 = skip the pair
) -> torch.Tensor:  # [T, E_h] = sum_k weight_k * expert_k(x)
    top_k = topk_ids.shape[1]
    flat_ids = topk_ids.flatten()  # [T*k]
    if expert_map is not None:  # other ranks' pairs become id X: sorted last, never run
        flat_ids = expert_map[flat_ids]
        flat_ids = torch.where(flat_ids < 0, num_experts, flat_ids)
    order = flat_ids.argsort(stable=True)  # pair indices grouped by expert
    counts = torch.bincount(flat_ids, minlength=num_experts).tolist()[:num_experts]
    flat_weights = topk_weights.flatten().to(x.dtype)  # [T*k]
    out = torch.zeros_like(x)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        pairs = order[start : start + count]  # [n]
        start += count
        tokens = pairs // top_k  # [n]
        hidden = expert_mlp(expert, x[tokens]) * flat_weights[pairs, None]  # [n, E_h]
        out.index_add_(0, tokens, hidden.to(out.dtype))
    return out


def rms_norm(
    x: torch.Tensor,  # [T, E]
    weight: torch.Tensor,  # [E]
    eps: float,
    residual: torch.Tensor | None = None,  # [T, E]; updated in place to x + residual
) -> torch.Tensor:  # [T, E]
    """RMSNorm as transformers computes it: statistics in fp32, the weight applied in the input dtype."""
    if residual is not None:
        residual.add_(x)
        x = residual
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # [T, 2I] -> [T, I]
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


FP8_GROUP = 128  # DeepSeek's FP8 block: 128x128 weight blocks, 128-channel activation groups
FP8_QUANT_EPS = 1e-10  # floor of a group's amax (an all-zero group quantises to zeros)


def per_token_group_quant_fp8(
    x: torch.Tensor,  # [T, K]
    group_size: int = FP8_GROUP,
) -> tuple[torch.Tensor, torch.Tensor]:  # fp8 [T, K], fp32 scales [T, ceil(K/group)]
    """Activations as the FP8 GEMM consumes them: each token's 128-channel group scaled by its
    amax / 448 and rounded to float8_e4m3fn (nearest even); x ~= q * scale."""
    fp8 = torch.float8_e4m3fn
    fp8_max = torch.finfo(fp8).max
    num_tokens, k = x.shape
    groups = -(-k // group_size)
    padded = F.pad(x.float(), (0, groups * group_size - k)).view(num_tokens, groups, group_size)
    scales = padded.abs().amax(dim=-1).clamp_min(FP8_QUANT_EPS) / fp8_max  # [T, G]
    q = (padded / scales[..., None]).clamp(-fp8_max, fp8_max).to(fp8)
    return q.view(num_tokens, groups * group_size)[:, :k].contiguous(), scales


def _expand_block_scales(scales: torch.Tensor, rows: int, cols: int, row_block: int, col_block: int) -> torch.Tensor:
    """[ceil(rows/rb), ceil(cols/cb)] block scales -> [rows, cols], each broadcast over its block."""
    return scales.float().repeat_interleave(row_block, dim=0)[:rows].repeat_interleave(col_block, dim=1)[:, :cols]


def fp8_block_gemm(
    x_q: torch.Tensor,  # [T, K] float8_e4m3fn
    x_scale: torch.Tensor,  # [T, ceil(K/128)] fp32
    weight: torch.Tensor,  # [N, K] float8_e4m3fn
    weight_scale_inv: torch.Tensor,  # [ceil(N/128), ceil(K/128)] fp32 (it multiplies, despite the name)
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:  # [T, N]
    """Both operands dequantised to fp32 and multiplied: the exact oracle of the Triton GEMM (which
    sums the same products block by block)."""
    num_tokens, k = x_q.shape
    x = x_q.float() * _expand_block_scales(x_scale, num_tokens, k, 1, FP8_GROUP)  # a scale per [1, 128] group
    w = weight.float() * _expand_block_scales(weight_scale_inv, weight.shape[0], k, FP8_GROUP, FP8_GROUP)
    return (x @ w.t()).to(out_dtype)


def fp8_linear(
    x: torch.Tensor,  # [..., K]
    weight: torch.Tensor,  # [N, K] float8_e4m3fn
    weight_scale_inv: torch.Tensor,  # [ceil(N/128), ceil(K/128)] fp32
    bias: torch.Tensor | None = None,  # [N]
    out_dtype: torch.dtype | None = None,  # default: x's dtype
) -> torch.Tensor:  # [..., N]
    """y = x W^T (+ b) with the GPU path's numerics: activations quantised per token per 128
    channels, then the block-scaled product."""
    x2 = x.reshape(-1, x.shape[-1])
    x_q, x_scale = per_token_group_quant_fp8(x2)
    out = fp8_block_gemm(x_q, x_scale, weight, weight_scale_inv, out_dtype or x.dtype)
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.view(*x.shape[:-1], weight.shape[0])
