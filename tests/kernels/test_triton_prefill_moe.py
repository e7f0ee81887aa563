"""The Triton prefill attention (GQA and absorbed MLA), fused MoE and grouped top-k router against their
torch references.
Without a GPU they run under TRITON_INTERPRET=1 (tests/conftest.py), so shapes stay small.

Every launcher runs with torch.empty / empty_like poisoned (NaN for floats, -1 for integers), so an
output element (or an intermediate) that a kernel forgets to write fails the comparison.

Tolerances (max abs and rel error vs the fp32 reference on the same rounded inputs): fp32 1e-4;
fp16 2e-3 for attention (GQA and MLA), 5e-3 for MoE (its [P, I] intermediate is rounded to fp16);
bf16 3e-2 for attention, 6e-2 for MoE. FP8 experts, relative to the output's max against the FP8
reference on the same fp8 weights: fp32 2e-3, bf16 3e-2. Router weights are fp32 whatever the
input: 1e-6, ids exact.
"""

from __future__ import annotations

import pytest
import torch

from ponder import kernels
from ponder.engine.runtime.fp8 import quantize_block_fp8
from ponder.kernels import reference
from ponder.kernels.triton_kernels.fused_moe import align_pairs
from ponder.kernels.triton_kernels.fused_moe import fused_moe as triton_fused_moe
from ponder.kernels.triton_kernels.prefill import paged_mla_prefill as triton_mla_prefill
from ponder.kernels.triton_kernels.prefill import paged_prefill_attention as triton_prefill
from ponder.kernels.triton_kernels.topk_router import grouped_topk as triton_grouped_topk
from tests.kernels.poison import poisoned_allocations

ATTENTION_TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 3e-2}
MOE_TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 6e-2}


# --- prefill attention ------------------------------------------------------------------------

BLOCK_SIZE = 16
# (cached prefix, new tokens) per sequence: ragged, at and across block boundaries, single tokens.
LAYOUTS = {
    "ragged": [(0, 7), (20, 13), (0, 64), (31, 1), (5, 40), (16, 16), (15, 2)],
    "single_token": [(0, 1)],
    "single_token_on_prefix": [(47, 1)],
    "one_long": [(3, 77)],
}


def _prefill_inputs(chunks, heads, kv_heads, dim, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    num_blocks = 64
    k_cache = torch.randn(num_blocks, BLOCK_SIZE, kv_heads, dim, generator=gen).to(dtype)  # [N, S, K, D]
    v_cache = torch.randn(num_blocks, BLOCK_SIZE, kv_heads, dim, generator=gen).to(dtype)
    context_lens = torch.tensor([p + n for p, n in chunks], dtype=torch.int64)  # [B]
    width = -(-int(context_lens.max()) // BLOCK_SIZE)
    tables = torch.stack([torch.randperm(num_blocks, generator=gen)[:width] for _ in chunks])  # [B, M]
    starts = torch.tensor([0, *torch.cumsum(torch.tensor([n for _, n in chunks]), 0).tolist()])  # [B+1]
    query = (2 * torch.randn(int(starts[-1]), heads, dim, generator=gen)).to(dtype)  # [T, H, D]
    max_query_len = max(n for _, n in chunks)
    return query, k_cache, v_cache, tables, starts, context_lens, max_query_len


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim", "dtype"),
    [
        (6, 2, 40, torch.float32),
        (4, 4, 64, torch.float16),
        (8, 1, 32, torch.float32),
        (4, 2, 32, torch.bfloat16),
        (2, 1, 192, torch.float16),  # wide heads (MLA-like 128 + 64): 32-key tiles
    ],
)
def test_prefill_matches_reference(layout, heads, kv_heads, dim, dtype):
    chunks = LAYOUTS[layout]
    inputs = _prefill_inputs(chunks, heads, kv_heads, dim, dtype, seed=heads * dim + len(chunks))
    query, k_cache, v_cache, tables, starts, context_lens, max_query_len = inputs
    scale = dim**-0.5
    with poisoned_allocations():
        ours = triton_prefill(query, k_cache, v_cache, tables, starts, context_lens, max_query_len, scale)
    expected = reference.paged_prefill_attention(
        query.float(), k_cache.float(), v_cache.float(), tables, starts, context_lens, max_query_len, scale
    )
    assert ours.shape == query.shape and ours.dtype == dtype
    tolerance = ATTENTION_TOLERANCE[dtype]
    torch.testing.assert_close(ours.float(), expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize(
    ("heads", "latent", "rope", "dtype"),
    [
        (4, 48, 16, torch.float32),  # C and C + R not powers of two
        (2, 64, 32, torch.float16),
        (3, 32, 16, torch.bfloat16),
        (2, 160, 24, torch.float32),  # wide latent (like R1's 512): the 32x32 tiles
    ],
)
def test_mla_prefill_matches_reference(layout, heads, latent, rope, dtype):
    """Absorbed MLA prefill: every head attends the one latent row per position (key = C + R, value =
    its first C), causally over the cached prefix and the new tokens."""
    chunks = LAYOUTS[layout]
    width = latent + rope
    query, cache, _, tables, starts, context_lens, max_query_len = _prefill_inputs(
        chunks, heads, 1, width, dtype, seed=heads * latent + len(chunks)
    )
    cache = cache[:, :, 0]  # [N, S, C + R]
    scale = width**-0.5
    args = (tables, starts, context_lens, max_query_len, latent, scale)
    with poisoned_allocations():
        ours = triton_mla_prefill(query, cache, *args)
    expected = reference.paged_mla_prefill(query.float(), cache.float(), *args)
    assert ours.shape == (query.shape[0], heads, latent) and ours.dtype == dtype
    tolerance = ATTENTION_TOLERANCE[dtype]
    torch.testing.assert_close(ours.float(), expected, atol=tolerance, rtol=tolerance)
    # the CPU dispatch (the C++ kernel where it builds) agrees too
    torch.testing.assert_close(kernels.paged_mla_prefill(query.float(), cache.float(), *args), expected)
    # int32 tables and offsets read the same (the kernel widens them to int64 offsets)
    narrow = (tables.int(), starts.int(), context_lens.int(), max_query_len, latent, scale)
    assert torch.equal(triton_mla_prefill(query, cache, *narrow), ours)


def test_prefill_empty_batch_launches_nothing():
    query = torch.empty(0, 4, 32)
    cache = torch.randn(4, BLOCK_SIZE, 2, 32)
    for tables, starts, lens in [
        (torch.zeros(0, 1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)),
        (torch.zeros(1, 1, dtype=torch.int64), torch.zeros(2, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)),
    ]:
        out = triton_prefill(query, cache, cache, tables, starts, lens, 0, 0.1)
        assert out.shape == (0, 4, 32)
        latent = triton_mla_prefill(
            torch.empty(0, 4, 40), torch.randn(4, BLOCK_SIZE, 40), tables, starts, lens, 0, 32, 0.1
        )
        assert latent.shape == (0, 4, 32)


# --- fused MoE --------------------------------------------------------------------------------


def _moe_inputs(tokens, hidden, experts, width, top_k, dtype, seed, used=None):
    """Routing draws from the first `used` experts only, so the others get no tokens."""
    gen = torch.Generator().manual_seed(seed)
    used = used or experts
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)  # [T, E]
    w13 = (torch.randn(experts, 2 * width, hidden, generator=gen) / hidden**0.5).to(dtype)  # [X, 2I, E]
    w2 = (torch.randn(experts, hidden, width, generator=gen) / width**0.5).to(dtype)  # [X, E, I]
    ids = torch.stack([torch.randperm(used, generator=gen)[:top_k] for _ in range(tokens)] or [torch.zeros(0)])
    ids = ids.long().view(tokens, top_k)  # [T, k]
    weights = torch.rand(tokens, top_k, generator=gen)  # [T, k]
    return x, w13, w2, weights, ids


@pytest.mark.parametrize(
    ("tokens", "hidden", "experts", "width", "top_k", "used"),
    [
        (1, 32, 4, 16, 1, None),  # a single token
        (5, 48, 8, 40, 2, 5),  # experts 5..7 get nothing; widths not multiples of the tiles
        (70, 64, 4, 32, 2, None),  # ~35 pairs per expert: segments span several row tiles
        (33, 80, 16, 24, 6, 9),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fused_moe_matches_reference(tokens, hidden, experts, width, top_k, used, dtype):
    x, w13, w2, weights, ids = _moe_inputs(
        tokens, hidden, experts, width, top_k, dtype, seed=tokens + hidden, used=used
    )
    with poisoned_allocations():
        ours = triton_fused_moe(x, w13, w2, weights, ids)
    expected = reference.fused_moe(x.float(), w13.float(), w2.float(), weights, ids)
    assert ours.shape == x.shape and ours.dtype == dtype
    tolerance = MOE_TOLERANCE[dtype]
    torch.testing.assert_close(ours.float(), expected, atol=tolerance, rtol=tolerance)


def _fp8_experts(w13: torch.Tensor, w2: torch.Tensor):
    """Per expert, gate, up and down quantised separately (as the checkpoint stores them) and stacked:
    w13 [X, 2I, E] fp8 with scales [X, 2*ceil(I/128), ceil(E/128)], w2 [X, E, I] with [X, ceil(E/128), ceil(I/128)]."""
    width = w2.shape[2]
    w13_q, w13_s, w2_q, w2_s = [], [], [], []
    for expert in range(w13.shape[0]):
        (gate, gate_s), (up, up_s) = (quantize_block_fp8(part.float()) for part in w13[expert].split(width))
        down, down_s = quantize_block_fp8(w2[expert].float())
        w13_q.append(torch.cat([gate, up]))
        w13_s.append(torch.cat([gate_s, up_s]))
        w2_q.append(down)
        w2_s.append(down_s)
    return torch.stack(w13_q), torch.stack(w13_s), torch.stack(w2_q), torch.stack(w2_s)


@pytest.mark.parametrize(
    ("tokens", "hidden", "experts", "width", "top_k", "used"),
    [
        (1, 128, 3, 128, 1, None),  # a single token, whole 128 blocks
        (6, 200, 4, 72, 2, 3),  # ragged blocks (E, I not multiples of 128), an idle expert
        (40, 256, 4, 136, 2, None),  # up's scale rows start past a partial gate block
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_moe_fp8_matches_reference(tokens, hidden, experts, width, top_k, used, dtype):
    """FP8 experts against the per-expert reference on the same fp8 weights and the same activation
    quantisation. Tolerance relative to the output's max: fp32 2e-3 (different fp32 sums can move
    an intermediate across an fp8 rounding boundary), bf16 3e-2 (bf16 inputs and outputs)."""
    x, w13, w2, weights, ids = _moe_inputs(tokens, hidden, experts, width, top_k, dtype, seed=tokens, used=used)
    w13_q, w13_s, w2_q, w2_s = _fp8_experts(w13, w2)
    with poisoned_allocations():
        ours = triton_fused_moe(x, w13_q, w2_q, weights, ids, w13_s, w2_s)
    expected = reference.fused_moe_fp8(x.float(), w13_q, w13_s, w2_q, w2_s, weights, ids)
    assert ours.shape == x.shape and ours.dtype == dtype and bool(ours.isfinite().all())
    err = (ours.float() - expected).abs().max().item() / expected.abs().max().item()
    assert err <= (2e-3 if dtype == torch.float32 else 3e-2), err
    # and the quantisation is close to the bf16 experts it came from (e4m3: 3 mantissa bits)
    unquantised = reference.fused_moe(x.float(), w13.float(), w2.float(), weights, ids)
    assert torch.linalg.norm(ours.float() - unquantised) / torch.linalg.norm(unquantised) < 0.1


def test_fused_moe_fp8_rejects_mismatched_scales():
    x, w13, w2, weights, ids = _moe_inputs(2, 128, 2, 128, 1, torch.float32, seed=0)
    w13_q, w13_s, w2_q, w2_s = _fp8_experts(w13, w2)
    with pytest.raises(AssertionError, match="w13_scale_inv"):
        triton_fused_moe(x, w13_q, w2_q, weights, ids, w13_s[:, :1], w2_s)
    with pytest.raises(AssertionError, match="float8_e4m3fn"):
        triton_fused_moe(x, w13, w2, weights, ids, w13_s, w2_s)


def test_fused_moe_large_tiles():
    """>= 1024 pairs switches to 64-row tiles."""
    x, w13, w2, weights, ids = _moe_inputs(350, 32, 8, 16, 3, torch.float32, seed=3, used=6)
    with poisoned_allocations():
        ours = triton_fused_moe(x, w13, w2, weights, ids)
    expected = reference.fused_moe(x, w13, w2, weights, ids)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


def test_fused_moe_empty_batch():
    x, w13, w2, weights, ids = _moe_inputs(0, 32, 4, 16, 2, torch.float32, seed=0)
    assert triton_fused_moe(x, w13, w2, weights, ids).shape == (0, 32)
    x, w13, w2, weights, ids = _moe_inputs(0, 128, 2, 128, 2, torch.bfloat16, seed=0)
    w13_q, w13_s, w2_q, w2_s = _fp8_experts(w13, w2)
    assert triton_fused_moe(x, w13_q, w2_q, weights, ids, w13_s, w2_s).shape == (0, 128)


def _expert_maps(experts: int, ranks: int) -> list[tuple[slice, torch.Tensor]]:
    """Expert parallelism's split: per rank, its experts (a slice of the stacked dim) and the
    [X] global -> local map (-1 for the other ranks' experts)."""
    per_rank, maps = experts // ranks, []
    for rank in range(ranks):
        local = slice(rank * per_rank, (rank + 1) * per_rank)
        expert_map = torch.full((experts,), -1, dtype=torch.int64)
        expert_map[local] = torch.arange(per_rank)
        maps.append((local, expert_map))
    return maps


@pytest.mark.parametrize("fp8", [False, True])
def test_fused_moe_expert_parallel_partial_sums(fp8):
    """`expert_map`: each rank's w13/w2 hold its experts only; its output is the pairs routed to
    them (the reference restricted alike), the other pairs add exactly nothing, and the ranks'
    outputs sum to the whole MoE. 4 ranks of 2 experts; routing uses experts 0..4, so rank 3 gets
    no pair at all and rank 2 one expert of two."""
    hidden, width = (128, 72) if fp8 else (48, 40)
    x, w13, w2, weights, ids = _moe_inputs(21, hidden, 8, width, 2, torch.float32, seed=5, used=5)
    scales: tuple[torch.Tensor, ...] = ()
    if fp8:
        w13, w13_s, w2, w2_s = _fp8_experts(w13, w2)
        scales = (w13_s, w2_s)
        whole = reference.fused_moe_fp8(x, w13, w13_s, w2, w2_s, weights, ids)
    else:
        whole = reference.fused_moe(x, w13, w2, weights, ids)
    total = torch.zeros_like(whole)
    for local, expert_map in _expert_maps(8, 4):
        rank_scales = [s[local].contiguous() for s in scales]
        with poisoned_allocations():
            ours = triton_fused_moe(x, w13[local], w2[local], weights, ids, *rank_scales, expert_map=expert_map)
        if fp8:
            expected = reference.fused_moe_fp8(
                x, w13[local], rank_scales[0], w2[local], rank_scales[1], weights, ids, expert_map=expert_map
            )
        else:
            expected = reference.fused_moe(x, w13[local], w2[local], weights, ids, expert_map)
        assert bool(ours.isfinite().all())
        torch.testing.assert_close(ours, expected, atol=2e-3 if fp8 else 1e-4, rtol=2e-3 if fp8 else 1e-4)
        if local.start >= 5:
            assert not bool(ours.any())  # no pair routed here: exactly zero
        total += expected
    torch.testing.assert_close(total, whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block_m", [16, 64])
def test_align_pairs_sorts_and_pads_by_expert(block_m):
    gen = torch.Generator().manual_seed(block_m)
    experts, tokens, top_k = 8, 40, 3
    ids = torch.stack([torch.randperm(6, generator=gen)[:top_k] for _ in range(tokens)])  # experts 6, 7 idle
    sorted_ids, tile_experts = align_pairs(ids, experts, block_m)  # [R], [R/BM]
    pairs = tokens * top_k
    assert sorted_ids.numel() == tile_experts.numel() * block_m
    real = sorted_ids[sorted_ids < pairs]
    assert torch.equal(real.sort().values, torch.arange(pairs))  # every pair exactly once
    for tile, expert in enumerate(tile_experts.tolist()):
        rows = sorted_ids[tile * block_m : (tile + 1) * block_m]
        rows = rows[rows < pairs]
        if expert < 0:
            assert rows.numel() == 0
        else:
            assert rows.numel() > 0 and bool((ids.flatten()[rows] == expert).all())
    assert 6 not in tile_experts.tolist() and 7 not in tile_experts.tolist()


# --- grouped top-k router ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tokens", "experts", "groups", "topk_groups", "top_k", "renormalize", "scaling"),
    [
        (3, 256, 8, 4, 8, True, 2.5),  # DeepSeek-V3/R1
        (1, 64, 8, 3, 6, True, 1.0),  # a single token
        (17, 12, 3, 2, 3, False, 1.5),  # nothing a power of two
        (6, 6, 6, 3, 2, True, 1.0),  # one expert per group: the group score is that expert's
        (5, 16, 1, 1, 4, True, 1.0),  # no groups
    ],
)
def test_grouped_topk_matches_reference(tokens, experts, groups, topk_groups, top_k, renormalize, scaling):
    gen = torch.Generator().manual_seed(experts + tokens)
    scores = torch.randn(tokens, experts, generator=gen).sigmoid()  # [T, X]
    bias = 0.1 * torch.randn(experts, generator=gen)  # [X]
    with poisoned_allocations():
        weights, ids = triton_grouped_topk(scores, bias, top_k, groups, topk_groups, renormalize, scaling)
    expected_weights, expected_ids = reference.grouped_topk(
        scores, bias, top_k, groups, topk_groups, renormalize, scaling
    )
    assert weights.dtype == torch.float32 and ids.dtype == torch.int64 and ids.shape == (tokens, top_k)
    # The order of the k choices is not part of the contract: compare them sorted by id.
    ids, order = ids.sort(dim=-1)
    expected_ids, expected_order = expected_ids.sort(dim=-1)
    assert torch.equal(ids, expected_ids)
    torch.testing.assert_close(
        weights.gather(1, order), expected_weights.gather(1, expected_order), atol=1e-6, rtol=1e-6
    )


def test_grouped_topk_empty_batch():
    weights, ids = triton_grouped_topk(torch.empty(0, 64), torch.zeros(64), 6, 8, 3, True, 1.0)
    assert weights.shape == ids.shape == (0, 6)


# --- dispatch ---------------------------------------------------------------------------------


def test_cpu_dispatch_keeps_the_references(monkeypatch):
    calls = []
    monkeypatch.setattr(reference, "fused_moe", lambda *a: calls.append("moe"))
    monkeypatch.setattr(reference, "grouped_topk", lambda *a: calls.append("topk"))
    kernels.fused_moe(
        torch.randn(1, 4), torch.randn(2, 4, 4), torch.randn(2, 4, 2), torch.ones(1, 1), torch.zeros(1, 1)
    )
    kernels.grouped_topk(torch.rand(1, 4), torch.zeros(4), 1, 1, 1, True, 1.0)
    assert calls == ["moe", "topk"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_dispatch_matches_reference():
    query, k_cache, v_cache, tables, starts, lens, max_len = _prefill_inputs(
        LAYOUTS["ragged"], 16, 4, 128, torch.bfloat16, seed=0
    )
    cuda = [t.cuda() for t in (query, k_cache, v_cache, tables, starts, lens)]
    ours = kernels.paged_prefill_attention(*cuda, max_len, 0.1)
    expected = reference.paged_prefill_attention(
        query.float(), k_cache.float(), v_cache.float(), tables, starts, lens, max_len, 0.1
    )
    torch.testing.assert_close(ours.cpu().float(), expected, atol=3e-2, rtol=3e-2)
    x, w13, w2, weights, ids = _moe_inputs(200, 256, 32, 128, 8, torch.bfloat16, seed=1)
    ours = kernels.fused_moe(x.cuda(), w13.cuda(), w2.cuda(), weights.cuda(), ids.cuda())
    expected = reference.fused_moe(x.float(), w13.float(), w2.float(), weights, ids)
    torch.testing.assert_close(ours.cpu().float(), expected, atol=6e-2, rtol=6e-2)
    w13_q, w13_s, w2_q, w2_s = _fp8_experts(w13, w2)
    fp8 = [t.cuda() for t in (w13_q, w13_s, w2_q, w2_s)]
    ours = kernels.fused_moe_fp8(x.cuda(), *fp8, weights.cuda(), ids.cuda())
    expected = reference.fused_moe_fp8(x.float(), w13_q, w13_s, w2_q, w2_s, weights, ids)
    assert (ours.cpu().float() - expected).abs().max() <= 3e-2 * expected.abs().max()
    query, cache, _, tables, starts, lens, max_len = _prefill_inputs(
        LAYOUTS["ragged"], 16, 1, 576, torch.bfloat16, seed=2
    )
    cache = cache[:, :, 0]
    args = (tables, starts, lens, max_len, 512, 0.1)
    ours = kernels.paged_mla_prefill(query.cuda(), cache.cuda(), *[a.cuda() if torch.is_tensor(a) else a for a in args])
    expected = reference.paged_mla_prefill(query.float(), cache.float(), *args)
    torch.testing.assert_close(ours.cpu().float(), expected, atol=3e-2, rtol=3e-2)
    scores, bias = torch.rand(64, 256), 0.1 * torch.randn(256)
    weights, ids = kernels.grouped_topk(scores.cuda(), bias.cuda(), 8, 8, 4, True, 2.5)
    expected_weights, expected_ids = reference.grouped_topk(scores, bias, 8, 8, 4, True, 2.5)
    assert torch.equal(ids.cpu().sort(-1).values, expected_ids.sort(-1).values)
