"""Paged decode attention for MHA/GQA, split-K (flash-decoding).

Stage 1: one program per (sequence, kv head, context split) attends the G query heads of its kv
head over its slice of the context with an online softmax, and writes the unnormalised partial
output with its running max and sum of exponentials. Stage 2: one program per (sequence, head)
rescales the splits to a common max and combines them. Scores are kept in base 2 (scaled by
log2 e) so the exponentials are exp2.

Dimension legend: B sequences, H query heads, K kv heads, G = H/K, D head dim, N cache blocks,
S block size, M blocks per sequence, P context splits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ponder.kernels.triton_kernels.online_softmax import dot_precision, online_softmax_step

LOG2E = 1.4426950408889634
TARGET_PROGRAMS = 512  # stage-1 programs to aim for when choosing the number of splits
MAX_SPLITS = 64


@triton.jit
def _decode_split_kernel(
    q_ptr,  # [B, H, D]
    k_cache_ptr,  # [N, S, K, D]
    v_cache_ptr,  # [N, S, K, D]
    tables_ptr,  # [B, M]
    lens_ptr,  # [B]
    out_ptr,  # [B, H, P, D] fp32, unnormalised
    max_ptr,  # [B, H, P] fp32, base-2 running max
    sum_ptr,  # [B, H, P] fp32, sum of exp2(score - max)
    stride_qb,
    stride_qh,
    stride_cn,  # k and v caches share their strides
    stride_cs,
    stride_ck,
    stride_tb,
    scale_log2,  # softmax scale * log2(e)
    block_size,
    split_len,  # context positions per split, a multiple of BLOCK_N
    groups,  # G
    head_dim,  # D
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,  # dot in fp32 (the interpreter's bf16 dot is wrong)
    PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    context_len = tl.load(lens_ptr + seq).to(tl.int32)
    start = split * split_len
    stop = tl.minimum(start + split_len, context_len)

    g = tl.arange(0, BLOCK_G)  # [BLOCK_G]
    d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    heads = kv_head * groups + g  # [BLOCK_G]
    q_mask = (g[:, None] < groups) & (d[None, :] < head_dim)  # [BLOCK_G, BLOCK_D]
    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=q_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)  # running max
    l_i = tl.zeros([BLOCK_G], tl.float32)  # running sum of exponentials
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    table = tables_ptr + seq.to(tl.int64) * stride_tb
    for first in range(start, stop, BLOCK_N):
        pos = first + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        valid = pos < stop
        block = tl.load(table + pos // block_size, mask=valid, other=0).to(tl.int64)
        rows = block * stride_cn + (pos % block_size) * stride_cs + kv_head * stride_ck  # [BLOCK_N]
        kv_mask = valid[:, None] & (d[None, :] < head_dim)  # [BLOCK_N, BLOCK_D]
        k = tl.load(k_cache_ptr + rows[:, None] + d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        v = tl.load(v_cache_ptr + rows[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # [BLOCK_G, BLOCK_N]
        s = tl.where(valid[None, :], s, float("-inf"))  # every tile has a valid position: the max stays finite
        m_i, l_i, acc = online_softmax_step(m_i, l_i, acc, s, v, PRECISION)

    head_mask = g < groups
    part = (seq * tl.num_programs(1) * groups + heads) * num_splits + split  # [BLOCK_G] index into [B, H, P]
    tl.store(max_ptr + part, m_i, mask=head_mask)
    tl.store(sum_ptr + part, l_i, mask=head_mask)
    tl.store(out_ptr + part[:, None] * head_dim + d[None, :], acc, mask=q_mask)


@triton.jit
def _combine_splits_kernel(
    out_ptr,  # [B, H, D]
    part_out_ptr,  # [B, H, P, D] fp32
    max_ptr,  # [B, H, P]
    sum_ptr,  # [B, H, P]
    stride_ob,
    stride_oh,
    num_heads,
    num_splits,
    width,  # D
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    p = tl.arange(0, BLOCK_P)  # [BLOCK_P]
    d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    base = (seq * num_heads + head) * num_splits
    split_mask = p < num_splits
    m = tl.load(max_ptr + base + p, mask=split_mask, other=float("-inf"))  # [BLOCK_P]
    l_part = tl.load(sum_ptr + base + p, mask=split_mask, other=0.0)
    m_max = tl.max(m, axis=0)
    weight = tl.where(m > float("-inf"), tl.exp2(m - m_max), 0.0)  # empty splits count for nothing
    mask = split_mask[:, None] & (d[None, :] < width)
    acc = tl.load(part_out_ptr + (base + p)[:, None] * width + d[None, :], mask=mask, other=0.0)  # [BLOCK_P, BLOCK_D]
    out = tl.sum(acc * weight[:, None], axis=0) / tl.sum(l_part * weight, axis=0)  # [BLOCK_D]
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < width)


def scratch(like: torch.Tensor, *shape: int) -> torch.Tensor:
    """The fp32 split partials (uninitialised: stage 1 writes every element; the tests poison them)."""
    return like.new_empty(*shape, dtype=torch.float32)


def choose_splits(programs: int, max_context: int, block_n: int) -> int:
    """Splits per sequence: enough stage-1 programs to fill the GPU, at least one tile each."""
    tiles = triton.cdiv(max_context, block_n)
    return max(1, min(MAX_SPLITS, tiles, triton.cdiv(TARGET_PROGRAMS, max(programs, 1))))


def combine_splits(
    out: torch.Tensor,  # [B, H, Dv]
    part_out: torch.Tensor,  # [B, H, P, Dv]
    part_max: torch.Tensor,  # [B, H, P]
    part_sum: torch.Tensor,  # [B, H, P]
) -> None:
    batch, num_heads, num_splits, width = part_out.shape
    _combine_splits_kernel[(batch, num_heads)](
        out, part_out, part_max, part_sum,
        out.stride(0), out.stride(1), num_heads, num_splits, width,
        BLOCK_P=triton.next_power_of_2(num_splits), BLOCK_D=triton.next_power_of_2(width),
    )  # fmt: skip


def check_paged_inputs(
    query: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor
) -> None:
    batch = query.shape[0]
    assert query.dtype == cache.dtype, f"query {query.dtype} != cache {cache.dtype}"
    assert query.dtype in (torch.float32, torch.float16, torch.bfloat16), f"unsupported dtype {query.dtype}"
    assert query.stride(-1) == cache.stride(-1) == 1, "the head dim must be contiguous"
    assert block_tables.dim() == 2 and block_tables.shape[0] == batch, f"block_tables {tuple(block_tables.shape)}"
    assert block_tables.dtype in (torch.int64, torch.int32) and block_tables.stride(1) == 1
    assert context_lens.shape == (batch,) and context_lens.dtype in (torch.int64, torch.int32)
    assert context_lens.is_contiguous()
    assert query.device == cache.device == block_tables.device == context_lens.device


def paged_decode_attention(
    query: torch.Tensor,  # [B, H, D]
    k_cache: torch.Tensor,  # [N, S, K, D]
    v_cache: torch.Tensor,  # [N, S, K, D]
    block_tables: torch.Tensor,  # [B, M] int64 or int32
    context_lens: torch.Tensor,  # [B], each >= 1
    scale: float,
    num_splits: int | None = None,  # default: from the batch and the table width (no host sync)
    block_n: int = 32,  # context positions per tile
    out: torch.Tensor | None = None,  # [B, H, D]
) -> torch.Tensor:  # [B, H, D]
    assert block_n >= 16, "tl.dot needs tiles of at least 16"
    batch, num_heads, head_dim = query.shape
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    assert k_cache.shape[3] == head_dim and v_cache.shape == k_cache.shape, "cache shapes"
    assert v_cache.stride() == k_cache.stride() and v_cache.dtype == k_cache.dtype, "k/v caches differ"
    assert num_heads % num_kv_heads == 0, f"{num_heads} heads not a multiple of {num_kv_heads} kv heads"
    check_paged_inputs(query, k_cache, block_tables, context_lens)
    out = query.new_empty(batch, num_heads, head_dim) if out is None else out
    assert out.shape == query.shape and out.dtype == query.dtype and out.stride(-1) == 1, "out"
    if batch == 0:
        return out
    groups = num_heads // num_kv_heads
    max_context = block_tables.shape[1] * block_size
    splits = num_splits or choose_splits(batch * num_kv_heads, max_context, block_n)
    split_len = triton.cdiv(triton.cdiv(max_context, splits), block_n) * block_n
    part_out = scratch(query, batch, num_heads, splits, head_dim)
    part_max, part_sum = scratch(query, batch, num_heads, splits), scratch(query, batch, num_heads, splits)
    _decode_split_kernel[(batch, num_kv_heads, splits)](
        query, k_cache, v_cache, block_tables, context_lens, part_out, part_max, part_sum,
        query.stride(0), query.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), scale * LOG2E, block_size, split_len, groups, head_dim,
        BLOCK_G=max(16, triton.next_power_of_2(groups)), BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_N=block_n,
        UPCAST=not query.is_cuda, PRECISION=dot_precision(query.dtype),
    )  # fmt: skip
    combine_splits(out, part_out, part_max, part_sum)
    return out
