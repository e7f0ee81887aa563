"""Paged MLA decode with absorbed weights, split-K.

All query heads share one latent "head" (MQA): the key is the whole cached row [c_KV | k_pe]
(C + R), the value its first C entries. Stage 1: one program per (sequence, block of heads,
context split) loads each latent tile once, scores it as q_c . c_KV + q_r . k_pe (the row is
handled as its C and R parts, so 576 = 512 + 64 needs no padding to 1024), and accumulates
p @ c_KV with an online softmax. Stage 2 is the split combine of paged_decode.

Dimension legend: B sequences, H heads, C kv_lora_rank, R rope dim, N cache blocks, S block
size, M blocks per sequence, P context splits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ponder.kernels.triton_kernels.online_softmax import dot_precision, online_softmax_step
from ponder.kernels.triton_kernels.paged_decode import (
    LOG2E,
    check_paged_inputs,
    choose_splits,
    combine_splits,
    scratch,
)


@triton.jit
def _mla_split_kernel(
    q_ptr,  # [B, H, C + R]
    cache_ptr,  # [N, S, C + R]
    tables_ptr,  # [B, M]
    lens_ptr,  # [B]
    out_ptr,  # [B, H, P, C] fp32, unnormalised
    max_ptr,  # [B, H, P] fp32, base-2 running max
    sum_ptr,  # [B, H, P] fp32
    stride_qb,
    stride_qh,
    stride_cn,
    stride_cs,
    stride_tb,
    scale_log2,
    block_size,
    split_len,  # a multiple of BLOCK_N
    num_heads,  # H
    latent_dim,  # C
    rope_dim,  # R
    BLOCK_H: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    head_block = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    context_len = tl.load(lens_ptr + seq).to(tl.int32)
    start = split * split_len
    stop = tl.minimum(start + split_len, context_len)

    h = head_block * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    c = tl.arange(0, BLOCK_C)  # [BLOCK_C]
    r = tl.arange(0, BLOCK_R)  # [BLOCK_R]
    h_mask = h < num_heads
    c_mask, r_mask = c < latent_dim, r < rope_dim
    q_rows = q_ptr + seq * stride_qb + h[:, None] * stride_qh  # [BLOCK_H, 1]
    q_c = tl.load(q_rows + c[None, :], mask=h_mask[:, None] & c_mask[None, :], other=0.0)  # [BLOCK_H, BLOCK_C]
    q_r = tl.load(q_rows + latent_dim + r[None, :], mask=h_mask[:, None] & r_mask[None, :], other=0.0)
    if UPCAST:
        q_c = q_c.to(tl.float32)
        q_r = q_r.to(tl.float32)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_C], tl.float32)
    table = tables_ptr + seq.to(tl.int64) * stride_tb
    for first in range(start, stop, BLOCK_N):
        pos = first + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        valid = pos < stop
        block = tl.load(table + pos // block_size, mask=valid, other=0).to(tl.int64)
        rows = cache_ptr + block * stride_cn + (pos % block_size) * stride_cs  # [BLOCK_N]
        kv = tl.load(rows[:, None] + c[None, :], mask=valid[:, None] & c_mask[None, :], other=0.0)  # [BLOCK_N, BLOCK_C]
        pe = tl.load(rows[:, None] + latent_dim + r[None, :], mask=valid[:, None] & r_mask[None, :], other=0.0)
        if UPCAST:
            kv = kv.to(tl.float32)
            pe = pe.to(tl.float32)
        s = tl.dot(q_c, tl.trans(kv), input_precision=PRECISION)  # [BLOCK_H, BLOCK_N]
        s = tl.dot(q_r, tl.trans(pe), acc=s, input_precision=PRECISION) * scale_log2
        s = tl.where(valid[None, :], s, float("-inf"))
        m_i, l_i, acc = online_softmax_step(m_i, l_i, acc, s, kv, PRECISION)  # the value is the latent

    part = (seq * num_heads + h) * num_splits + split  # [BLOCK_H] index into [B, H, P]
    tl.store(max_ptr + part, m_i, mask=h_mask)
    tl.store(sum_ptr + part, l_i, mask=h_mask)
    tl.store(out_ptr + part[:, None] * latent_dim + c[None, :], acc, mask=h_mask[:, None] & c_mask[None, :])


def paged_mla_decode(
    query: torch.Tensor,  # [B, H, C + R]: absorbed q_nope | roped q_pe
    cache: torch.Tensor,  # [N, S, C + R]
    block_tables: torch.Tensor,  # [B, M] int64 or int32
    context_lens: torch.Tensor,  # [B], each >= 1
    kv_lora_rank: int,  # C
    scale: float,
    num_splits: int | None = None,  # default: from the batch and the table width (no host sync)
    block_h: int = 16,  # heads per program
    block_n: int = 32,  # context positions per tile
    out: torch.Tensor | None = None,  # [B, H, C]
) -> torch.Tensor:  # [B, H, C]
    assert block_h >= 16 and block_n >= 16, "tl.dot needs tiles of at least 16"
    batch, num_heads, width = query.shape
    rope_dim = width - kv_lora_rank
    assert cache.dim() == 3 and cache.shape[2] == width, f"cache {tuple(cache.shape)} vs query width {width}"
    assert 0 < rope_dim and kv_lora_rank > 0, f"width {width} must be C + R with C = {kv_lora_rank}"
    check_paged_inputs(query, cache, block_tables, context_lens)
    out = query.new_empty(batch, num_heads, kv_lora_rank) if out is None else out
    assert out.shape == (batch, num_heads, kv_lora_rank) and out.dtype == query.dtype and out.stride(-1) == 1
    if batch == 0:
        return out
    head_blocks = triton.cdiv(num_heads, block_h)
    max_context = block_tables.shape[1] * cache.shape[1]
    splits = num_splits or choose_splits(batch * head_blocks, max_context, block_n)
    split_len = triton.cdiv(triton.cdiv(max_context, splits), block_n) * block_n
    part_out = scratch(query, batch, num_heads, splits, kv_lora_rank)
    part_max, part_sum = scratch(query, batch, num_heads, splits), scratch(query, batch, num_heads, splits)
    _mla_split_kernel[(batch, head_blocks, splits)](
        query, cache, block_tables, context_lens, part_out, part_max, part_sum,
        query.stride(0), query.stride(1), cache.stride(0), cache.stride(1), block_tables.stride(0),
        scale * LOG2E, cache.shape[1], split_len, num_heads, kv_lora_rank, rope_dim,
        BLOCK_H=block_h, BLOCK_C=max(16, triton.next_power_of_2(kv_lora_rank)),
        BLOCK_R=max(16, triton.next_power_of_2(rope_dim)), BLOCK_N=block_n,
        UPCAST=not query.is_cuda, PRECISION=dot_precision(query.dtype),
    )  # fmt: skip
    combine_splits(out, part_out, part_max, part_sum)
    return out
