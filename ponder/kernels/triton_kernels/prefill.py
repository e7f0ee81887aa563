"""Paged prefill attention: causal flash attention of each sequence's new tokens over its paged
context (the cached prefix plus the new tokens themselves, already stored in the cache).

One program per (query tile, sequence, query head). It walks the sequence's context in key tiles,
reading K/V rows through the block table (no per-head copy of the context is ever made), with an
online softmax in fp32. Each head reads its kv head's rows (GQA).

The same kernel serves MLA's absorbed prefill (`paged_mla_prefill`): every head attends the one
latent row per position, [c_KV | k_pe] (C + R), whose first C entries are also the value. Query
and key are then taken as a D = C part and an R = rope part (scores = q_c.c_KV + q_r.k_pe), so
576 = 512 + 64 needs no padding to 1024 and the value is the key tile already loaded.

Dimension legend: T tokens in the step, B sequences, H query heads, K kv heads, G = H/K, D head dim
(the value width), R the key's rope tail (MLA; 0 for GQA), N cache blocks, S block size, M blocks
per sequence.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ponder.kernels.triton_kernels.online_softmax import dot_precision, online_softmax_step

# Under the interpreter tl.dot on bf16 operands is wrong (triton 3.9): upcast there, not on a GPU.
_UPCAST = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _prefill_kernel(
    q_ptr,  # [T, H, D + R]
    k_ptr,  # [N, S, K, D + R]
    v_ptr,  # [N, S, K, D] (unread when VALUE_IS_KEY)
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
    HEAD_DIM: tl.constexpr,  # D
    ROPE_DIM: tl.constexpr,  # R: query and key rows carry R more entries after D (MLA), else 0
    BLOCK_SIZE: tl.constexpr,  # S
    GROUPS: tl.constexpr,  # G
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    VALUE_IS_KEY: tl.constexpr,  # MLA: the value is the key row's first D entries
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    kv_head = head // GROUPS
    start = tl.load(starts_ptr + seq).to(tl.int64)
    query_len = tl.load(starts_ptr + seq + 1) - start
    if tile * BLOCK_M >= query_len:
        return
    context_len = tl.load(context_lens_ptr + seq)
    prefix = context_len - query_len

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] rows among the new tokens
    row_ok = rows < query_len
    dims = tl.arange(0, BLOCK_D)  # [BD]
    dim_ok = dims < HEAD_DIM
    q_rows = q_ptr + (start + rows)[:, None] * stride_qt + head * stride_qh  # [BM, 1]
    q = tl.load(q_rows + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)  # [BM, BD]
    rope = tl.arange(0, BLOCK_R)  # [BR]
    rope_ok = rope < ROPE_DIM
    q_rope = tl.zeros([BLOCK_M, BLOCK_R], dtype=q.dtype)
    if ROPE_DIM > 0:
        q_rope = tl.load(q_rows + HEAD_DIM + rope[None, :], mask=row_ok[:, None] & rope_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        q_rope = q_rope.to(tl.float32)
    query_pos = prefix + rows  # [BM] position of each row; it sees keys 0..query_pos

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # running max (log2 domain)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running denominator
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # The tile's last row sees keys up to prefix + its row: no key tile past that is read.
    key_end = tl.minimum(context_len, prefix + (tile + 1) * BLOCK_M)
    for key_start in range(0, key_end, BLOCK_N):
        keys = key_start + tl.arange(0, BLOCK_N)  # [BN] context positions
        key_ok = keys < key_end
        # int64 offsets: block * stride exceeds 2^31 in large caches, whatever the table's dtype
        blocks = tl.load(tables_ptr + seq * stride_tb + keys // BLOCK_SIZE, mask=key_ok, other=0).to(tl.int64)
        slots = keys % BLOCK_SIZE
        kv_mask = key_ok[:, None] & dim_ok[None, :]
        k_rows = k_ptr + blocks[:, None] * stride_kn + slots[:, None] * stride_ks + kv_head * stride_kk  # [BN, 1]
        k = tl.load(k_rows + dims[None, :], mask=kv_mask, other=0.0)  # [BN, BD]
        if VALUE_IS_KEY:
            v = k
        else:
            v_rows = v_ptr + blocks[:, None] * stride_vn + slots[:, None] * stride_vs + kv_head * stride_vk
            v = tl.load(v_rows + dims[None, :], mask=kv_mask, other=0.0)  # [BN, BD]
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [BM, BN]
        if ROPE_DIM > 0:
            k_rope = tl.load(k_rows + HEAD_DIM + rope[None, :], mask=key_ok[:, None] & rope_ok[None, :], other=0.0)
            if UPCAST:
                k_rope = k_rope.to(tl.float32)
            scores = tl.dot(q_rope, tl.trans(k_rope), scores, input_precision=PRECISION)  # [BM, BN]
        scores *= qk_scale
        visible = key_ok[None, :] & (keys[None, :] <= query_pos[:, None])
        scores = tl.where(visible, scores, float("-inf"))
        m_i, l_i, acc = online_softmax_step(m_i, l_i, acc, scores, v, PRECISION)
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
    assert k_cache.shape == v_cache.shape and k_cache.shape[3] == head_dim, (k_cache.shape, v_cache.shape)
    assert num_heads % num_kv_heads == 0, "query heads must be a multiple of kv heads"
    assert query.dtype == k_cache.dtype == v_cache.dtype, (query.dtype, k_cache.dtype)
    assert v_cache.stride(-1) == 1 and v_cache.stride()[:3] == k_cache.stride()[:3], "k and v caches alike"
    out = torch.empty_like(query)
    _launch(query, k_cache, v_cache, out, block_tables, query_start_loc, context_lens, max_query_len, scale, 0)
    return out


def paged_mla_prefill(
    query: torch.Tensor,  # [T, H, C + R]: absorbed q_nope (W_UK^T q) | roped q_pe
    cache: torch.Tensor,  # [N, S, C + R] latent rows, already holding the new tokens'
    block_tables: torch.Tensor,  # [B, M]
    query_start_loc: torch.Tensor,  # [B+1]
    context_lens: torch.Tensor,  # [B] cached prefix + new tokens
    max_query_len: int,
    kv_lora_rank: int,  # C
    scale: float,
) -> torch.Tensor:  # [T, H, C]: attention-weighted latents (W_UV is applied by the caller)
    num_tokens, num_heads, width = query.shape
    rope_dim = width - kv_lora_rank
    assert cache.dim() == 3 and cache.shape[2] == width, f"cache {tuple(cache.shape)} vs query width {width}"
    assert 0 < rope_dim and kv_lora_rank > 0, f"width {width} must be C + R with C = {kv_lora_rank}"
    assert query.dtype == cache.dtype, (query.dtype, cache.dtype)
    latents = cache.unsqueeze(2)  # [N, S, 1, C + R]: one kv head
    out = query.new_empty(num_tokens, num_heads, kv_lora_rank)
    _launch(query, latents, latents, out, block_tables, query_start_loc, context_lens, max_query_len, scale, rope_dim)
    return out


def _launch(query, k_cache, v_cache, out, block_tables, query_start_loc, context_lens, max_query_len, scale, rope_dim):
    """One kernel launch for either layout; head dim D = out's width, R = rope_dim more in q and k."""
    num_tokens, num_heads, head_dim = out.shape
    batch = block_tables.shape[0]
    assert query.stride(-1) == 1 and k_cache.stride(-1) == 1, "the head dim must be contiguous"
    assert query_start_loc.shape == (batch + 1,) and context_lens.shape == (batch,)
    assert block_tables.stride(-1) == 1 and not block_tables.is_floating_point()
    if num_tokens == 0 or batch == 0:
        return
    block_d = max(16, triton.next_power_of_2(head_dim))
    # Wide heads (MLA's 512): smaller tiles and no software pipelining, so that a [32, 512] query,
    # key tile and accumulator fit in registers and shared memory (SGLang's extend kernel for 576
    # runs 32-row tiles with num_stages=1 too). Untuned: no GPU has run this yet.
    wide = block_d > 128
    block_m = 32 if wide else 64
    block_m = block_m if max_query_len > block_m // 2 else max(16, triton.next_power_of_2(max_query_len))
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
        ROPE_DIM=rope_dim,
        BLOCK_SIZE=k_cache.shape[1],
        GROUPS=num_heads // k_cache.shape[2],
        BLOCK_M=block_m,
        BLOCK_N=32 if wide else 64,
        BLOCK_D=block_d,
        BLOCK_R=max(16, triton.next_power_of_2(rope_dim)),
        VALUE_IS_KEY=rope_dim > 0,
        UPCAST=_UPCAST,
        PRECISION=dot_precision(query.dtype),
        num_warps=4 if block_d <= 64 else 8,
        num_stages=1 if wide else 3,
    )
