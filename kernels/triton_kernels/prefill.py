"""Paged prefill attention: causal flash attention of each sequence's new tokens over its paged
context (the cached prefix plus the new tokens themselves, already stored in the cache).

One program per (query tile, sequence, query head). It walks the sequence's context in key tiles,
reading K/V rows through the block table (no per-head copy of the context is ever made), with an
online softmax in fp32. Each head reads its kv head's rows (GQA).

Dimension legend: T tokens in the step, B sequences, H query heads, K kv heads, G = H/K, D head dim,
N cache blocks, S block size, M blocks per sequence.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

# Under the interpreter tl.dot on bf16 operands is wrong (triton 3.9): upcast there, not on a GPU.
_UPCAST = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _prefill_kernel(
    q_ptr,  # [T, H, D]
    k_ptr,  # [N, S, K, D]
    v_ptr,  # [N, S, K, D]
    out_ptr,  # [T, H, D]
    tables_ptr,  # [B, M]
    starts_ptr,  # [B+1]
    context_lens_ptr,  # [B]
    qk_scale,  # softmax scale * log2(e)
    stride_qt,
    stride_qh,
    stride_kn,
    stride_ks,
    stride_kk,
    stride_vn,
    stride_vs,
    stride_vk,
    stride_ot,
    stride_oh,
    stride_tb,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # S
    GROUPS: tl.constexpr,  # G
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
):
    tile = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    kv_head = head // GROUPS
    start = tl.load(starts_ptr + seq)
    query_len = tl.load(starts_ptr + seq + 1) - start
    if tile * BLOCK_M >= query_len:
        return
    context_len = tl.load(context_lens_ptr + seq)
    prefix = context_len - query_len

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] rows among the new tokens
    row_ok = rows < query_len
    dims = tl.arange(0, BLOCK_D)  # [BD]
    dim_ok = dims < HEAD_DIM
    q_ptrs = q_ptr + (start + rows)[:, None] * stride_qt + head * stride_qh + dims[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)  # [BM, BD]
    if UPCAST:
        q = q.to(tl.float32)
    query_pos = prefix + rows  # [BM] position of each row; it sees keys 0..query_pos

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # running max (log2 domain)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running denominator
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # The tile's last row sees keys up to prefix + its row: no key tile past that is read.
    key_end = tl.minimum(context_len, prefix + (tile + 1) * BLOCK_M)
    for key_start in range(0, key_end, BLOCK_N):
        keys = key_start + tl.arange(0, BLOCK_N)  # [BN] context positions
        key_ok = keys < key_end
        blocks = tl.load(tables_ptr + seq * stride_tb + keys // BLOCK_SIZE, mask=key_ok, other=0)  # [BN]
        slots = keys % BLOCK_SIZE
        kv_mask = key_ok[:, None] & dim_ok[None, :]
        k_ptrs = k_ptr + blocks[:, None] * stride_kn + slots[:, None] * stride_ks + kv_head * stride_kk + dims[None, :]
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)  # [BN, BD]
        v_ptrs = v_ptr + blocks[:, None] * stride_vn + slots[:, None] * stride_vs + kv_head * stride_vk + dims[None, :]
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)  # [BN, BD]
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        scores = tl.dot(q, tl.trans(k)) * qk_scale  # [BM, BN]
        visible = key_ok[None, :] & (keys[None, :] <= query_pos[:, None])
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))  # [BM]
        p = tl.math.exp2(scores - m_new[:, None])  # [BM, BN]
        alpha = tl.math.exp2(m_i - m_new)  # [BM]
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / l_i[:, None]  # every real row sees key 0, so l_i > 0 there
    o_ptrs = out_ptr + (start + rows)[:, None] * stride_ot + head * stride_oh + dims[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


def paged_prefill_attention(
    query: torch.Tensor,  # [T, H, D], the sequences' new tokens back to back
    k_cache: torch.Tensor,  # [N, S, K, D], already holding the new tokens' K/V
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, M]
    query_start_loc: torch.Tensor,  # [B+1]
    context_lens: torch.Tensor,  # [B] cached prefix + new tokens
    max_query_len: int,
    scale: float,
    plan: object = None,  # the reference's masks; not needed here
) -> torch.Tensor:  # [T, H, D]
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = k_cache.shape[2]
    batch = block_tables.shape[0]
    assert k_cache.shape == v_cache.shape and k_cache.shape[3] == head_dim, (k_cache.shape, v_cache.shape)
    assert num_heads % num_kv_heads == 0, "query heads must be a multiple of kv heads"
    assert query.dtype == k_cache.dtype == v_cache.dtype, (query.dtype, k_cache.dtype)
    assert query.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    assert query_start_loc.shape == (batch + 1,) and context_lens.shape == (batch,)
    assert block_tables.stride(-1) == 1 and not block_tables.is_floating_point()
    out = torch.empty_like(query)
    if num_tokens == 0 or batch == 0:
        return out
    block_m = 64 if max_query_len > 32 else max(16, triton.next_power_of_2(max_query_len))
    block_d = max(16, triton.next_power_of_2(head_dim))
    grid = (triton.cdiv(max_query_len, block_m), batch, num_heads)
    _prefill_kernel[grid](
        query,
        k_cache,
        v_cache,
        out,
        block_tables,
        query_start_loc,
        context_lens,
        scale * math.log2(math.e),
        *query.stride()[:2],
        *k_cache.stride()[:3],
        *v_cache.stride()[:3],
        *out.stride()[:2],
        block_tables.stride(0),
        HEAD_DIM=head_dim,
        BLOCK_SIZE=k_cache.shape[1],
        GROUPS=num_heads // num_kv_heads,
        BLOCK_M=block_m,
        BLOCK_N=64 if block_d <= 128 else 32,  # wide heads: smaller key tiles, fewer registers
        BLOCK_D=block_d,
        UPCAST=_UPCAST,
        num_warps=4 if block_d <= 64 else 8,
    )
    return out
