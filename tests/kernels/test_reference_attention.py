"""The paged attention references against plain per-sequence causal attention on unpaged K/V."""

import torch

from ponder import kernels

torch.manual_seed(0)


def scatter_into_cache(keys, values, num_blocks, block_size):
    """Put each sequence's K/V into randomly chosen blocks; return caches and block tables."""
    k_cache = torch.zeros(num_blocks, block_size, *keys[0].shape[1:])
    v_cache = torch.zeros_like(k_cache)
    free = torch.randperm(num_blocks).tolist()
    tables = []
    for k, v in zip(keys, values, strict=True):
        n_blocks = -(-k.shape[0] // block_size)
        table = [free.pop() for _ in range(n_blocks)]
        slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(k.shape[0])])
        kernels.store_kvcache(k, v, k_cache, v_cache, slots)
        tables.append(table)
    width = max(map(len, tables))
    return k_cache, v_cache, torch.tensor([t + [0] * (width - len(t)) for t in tables])


def naive_attention(q, k, v, scale):
    """q [Q, H, D] are the last Q positions of k/v [L, K, D]; causal."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = torch.einsum("qhd,lhd->hql", q, k) * scale
    offset = k.shape[0] - q.shape[0]
    allowed = torch.arange(k.shape[0])[None, :] <= (torch.arange(q.shape[0])[:, None] + offset)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hql,lhd->qhd", scores.softmax(-1), v)


def test_decode_matches_naive_for_variable_lengths():
    heads, kv_heads, dim, scale = 8, 2, 16, 0.25
    lengths = [1, 5, 16, 17, 40]
    keys = [torch.randn(n, kv_heads, dim) for n in lengths]
    values = [torch.randn(n, kv_heads, dim) for n in lengths]
    k_cache, v_cache, tables = scatter_into_cache(keys, values, num_blocks=32, block_size=8)
    q = torch.randn(len(lengths), heads, dim)
    out = kernels.paged_decode_attention(q, k_cache, v_cache, tables, torch.tensor(lengths), scale)
    for i in range(len(lengths)):
        expected = naive_attention(q[i : i + 1], keys[i], values[i], scale)[0]
        torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=1e-5)


def test_prefill_over_cached_prefix_matches_naive():
    heads, kv_heads, dim, scale = 6, 3, 8, 0.3
    contexts = [(0, 7), (9, 4), (16, 16), (3, 1)]  # (cached prefix, new tokens)
    keys = [torch.randn(p + n, kv_heads, dim) for p, n in contexts]
    values = [torch.randn(p + n, kv_heads, dim) for p, n in contexts]
    k_cache, v_cache, tables = scatter_into_cache(keys, values, num_blocks=40, block_size=4)
    queries = [torch.randn(n, heads, dim) for _, n in contexts]
    starts = torch.tensor([0, *torch.cumsum(torch.tensor([n for _, n in contexts]), 0).tolist()])
    out = kernels.paged_prefill_attention(
        torch.cat(queries),
        k_cache,
        v_cache,
        tables,
        starts,
        torch.tensor([p + n for p, n in contexts]),
        max(n for _, n in contexts),
        scale,
    )
    for i, q in enumerate(queries):
        expected = naive_attention(q, keys[i], values[i], scale)
        torch.testing.assert_close(out[starts[i] : starts[i + 1]], expected, atol=1e-5, rtol=1e-5)


def test_store_skips_negative_slots():
    k_cache = torch.zeros(2, 4, 1, 2)
    v_cache = torch.zeros_like(k_cache)
    k = torch.ones(3, 1, 2)
    kernels.store_kvcache(k, 2 * k, k_cache, v_cache, torch.tensor([0, -1, 5]))
    assert k_cache.view(-1, 1, 2)[[0, 5]].eq(1).all() and v_cache.view(-1, 1, 2)[[0, 5]].eq(2).all()
    assert k_cache.sum() == 4  # two slots written, two values each
