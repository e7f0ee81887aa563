"""The Triton KV-store, paged decode and paged MLA decode kernels against the torch references.

Without a GPU they run in Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1), so the shapes are small; the launchers are called directly, since the
dispatch only routes CUDA tensors to them. Outputs and split scratch are filled with NaN before a
run, so an element a kernel fails to write fails the comparison; caches are NaN outside the slots
the reference writes, so a write to a skipped (-1) or foreign slot fails too.

Tolerances against the fp32 reference on the same (rounded) inputs: fp32 2e-5 (the kernels sum in
a different order and use exp2), fp16 2e-3 and bf16 2e-2 (one rounding of the output).
Dimension legend: T tokens, B sequences, H heads, K kv heads, D head dim, N blocks, S block size,
M blocks per sequence, C latent rank, R rope dim.
"""

from __future__ import annotations

import pytest
import torch

from ponder.kernels import reference
from ponder.kernels.triton_kernels import kv_store, mla_decode, paged_decode

TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def poisoned_scratch(monkeypatch):
    """Split partials start as NaN: stage 1 must write every (sequence, head, split)."""

    def nan_scratch(like: torch.Tensor, *shape: int) -> torch.Tensor:
        return torch.full(shape, float("nan"), dtype=torch.float32, device=like.device)

    monkeypatch.setattr(paged_decode, "scratch", nan_scratch)
    monkeypatch.setattr(mla_decode, "scratch", nan_scratch)


def _tables(gen: torch.Generator, batch: int, width: int, num_blocks: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, M] distinct random blocks per sequence (the reference gathers every column)."""
    rows = [torch.randperm(num_blocks, generator=gen)[:width] for _ in range(batch)]
    return (torch.stack(rows) if rows else torch.zeros(0, width, dtype=torch.int64)).to(dtype)


def _slots(gen: torch.Generator, num_tokens: int, num_slots: int, dtype: torch.dtype) -> torch.Tensor:
    """[T] distinct random slots, every third one -1 (skipped)."""
    slots = torch.randperm(num_slots, generator=gen)[:num_tokens]
    slots[::3] = -1
    return slots.to(dtype)


# ---- KV store -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("tokens", "kv_heads", "dim", "block_size"), [(7, 2, 64, 16), (1, 1, 80, 64), (20, 4, 32, 16), (0, 2, 64, 16)]
)
@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32])
def test_store_kvcache_matches_reference(dtype, tokens, kv_heads, dim, block_size, slot_dtype):
    gen = torch.Generator().manual_seed(tokens * dim + kv_heads)
    num_blocks = 6
    qkv = torch.randn(tokens, 3, kv_heads, dim, generator=gen).to(dtype)  # [T, 3, K, D]
    key, value = qkv[:, 1], qkv[:, 2]  # strided views, as a fused qkv projection gives them
    slots = _slots(gen, tokens, num_blocks * block_size, slot_dtype)
    k_cache = torch.full((num_blocks, block_size, kv_heads, dim), float("nan"), dtype=dtype)  # [N, S, K, D]
    v_cache = k_cache.clone()
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    reference.store_kvcache(key, value, expected_k, expected_v, slots.long())
    kv_store.store_kvcache(key, value, k_cache, v_cache, slots)
    torch.testing.assert_close(k_cache, expected_k, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, expected_v, atol=0, rtol=0, equal_nan=True)
    assert int(k_cache.isnan().any(dim=(2, 3)).logical_not().sum()) == int((slots >= 0).sum())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("tokens", "latent", "rope", "block_size"), [(9, 512, 64, 64), (5, 64, 16, 16), (0, 64, 16, 16)]
)
def test_store_latent_cache_matches_reference(dtype, tokens, latent, rope, block_size):
    gen = torch.Generator().manual_seed(tokens + latent)
    num_blocks = 3
    fused = torch.randn(tokens, 8 + latent + rope, generator=gen).to(dtype)
    row = fused[:, 8:]  # [T, C + R], a strided view
    slots = _slots(gen, tokens, num_blocks * block_size, torch.int64)
    cache = torch.full((num_blocks, block_size, latent + rope), float("nan"), dtype=dtype)  # [N, S, C + R]
    expected = cache.clone()
    reference.store_latent_cache(row, expected, slots)
    kv_store.store_latent_cache(row, cache, slots)
    torch.testing.assert_close(cache, expected, atol=0, rtol=0, equal_nan=True)
    assert int(cache.isnan().any(dim=2).logical_not().sum()) == int((slots >= 0).sum())


def test_store_rejects_bad_inputs():
    key = torch.randn(3, 2, 16)
    cache = torch.zeros(2, 16, 2, 16)
    with pytest.raises(AssertionError, match="slot_mapping"):
        kv_store.store_kvcache(key, key, cache, cache, torch.tensor([0, 1]))
    with pytest.raises(AssertionError, match="dtype"):
        kv_store.store_kvcache(key, key, cache.half(), cache.half(), torch.tensor([0, 1, 2]))
    with pytest.raises(AssertionError, match="latent width"):
        kv_store.store_latent_cache(torch.randn(3, 80), torch.zeros(2, 16, 96), torch.tensor([0, 1, 2]))


# ---- paged decode (GQA) -------------------------------------------------------------------------

# (H, K, D, S, context lengths): ragged; at, below and across block boundaries; a single token.
DECODE_CASES = [
    (8, 2, 64, 16, [1, 15, 16, 17, 47]),
    (4, 4, 32, 64, [63, 64, 65, 130]),  # MHA, block size 64
    (12, 2, 80, 16, [33, 5, 32]),  # G = 6 and D = 80: padded tiles
    (2, 1, 64, 16, [1]),  # one sequence, one token
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("heads", "kv_heads", "dim", "block_size", "lens"), DECODE_CASES)
@pytest.mark.parametrize("num_splits", [None, 3])  # the launcher's choice; 3 leaves some splits empty
def test_paged_decode_matches_reference(dtype, heads, kv_heads, dim, block_size, lens, num_splits):
    gen = torch.Generator().manual_seed(heads * dim + block_size)
    num_blocks, batch = 24, len(lens)
    context_lens = torch.tensor(lens)
    width = -(-max(lens) // block_size)
    tables = _tables(gen, batch, width, num_blocks, torch.int32 if num_splits else torch.int64)
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=gen).to(dtype)  # [N, S, K, D]
    v_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=gen).to(dtype)
    query = (3 * torch.randn(batch, heads, dim, generator=gen)).to(dtype)  # [B, H, D]
    scale = dim**-0.5
    out = torch.full_like(query, float("nan"))
    ours = paged_decode.paged_decode_attention(
        query, k_cache, v_cache, tables, context_lens, scale, num_splits=num_splits, out=out
    )
    expected = reference.paged_decode_attention(
        query.float(), k_cache.float(), v_cache.float(), tables.long(), context_lens, scale
    )
    assert ours is out and ours.dtype == dtype
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(ours.float(), expected, atol=tol, rtol=tol)


def test_paged_decode_empty_batch():
    cache = torch.randn(4, 16, 2, 32)
    out = paged_decode.paged_decode_attention(
        torch.randn(0, 4, 32),
        cache,
        cache,
        torch.zeros(0, 3, dtype=torch.int64),
        torch.zeros(0, dtype=torch.int64),
        1.0,
    )
    assert out.shape == (0, 4, 32)


def test_paged_decode_rejects_bad_inputs():
    cache = torch.randn(4, 16, 2, 32)
    tables, lens = torch.zeros(1, 2, dtype=torch.int64), torch.tensor([3])
    with pytest.raises(AssertionError, match="multiple of"):
        paged_decode.paged_decode_attention(torch.randn(1, 3, 32), cache, cache, tables, lens, 1.0)
    with pytest.raises(AssertionError, match="dtype|!="):
        paged_decode.paged_decode_attention(torch.randn(1, 4, 32).half(), cache, cache, tables, lens, 1.0)
    with pytest.raises(AssertionError):
        paged_decode.paged_decode_attention(torch.randn(1, 4, 32), cache, cache, tables.float(), lens, 1.0)


# ---- paged MLA decode ---------------------------------------------------------------------------

# (H, C, R, S, context lengths, heads per program)
MLA_CASES = [
    (16, 512, 64, 64, [1, 63, 64, 65, 129], 16),  # R1's 576 = 512 + 64, block size 64
    (20, 64, 16, 16, [15, 16, 17, 40], 16),  # H not a multiple of the head block
    (32, 128, 32, 16, [50, 3], 32),
    (4, 512, 64, 64, [1], 16),  # one sequence, one token, fewer heads than the block
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("heads", "latent", "rope", "block_size", "lens", "block_h"), MLA_CASES)
@pytest.mark.parametrize("num_splits", [None, 3])
def test_paged_mla_decode_matches_reference(dtype, heads, latent, rope, block_size, lens, block_h, num_splits):
    gen = torch.Generator().manual_seed(heads + latent + block_size)
    num_blocks, batch = 12, len(lens)
    context_lens = torch.tensor(lens)
    width = -(-max(lens) // block_size)
    tables = _tables(gen, batch, width, num_blocks, torch.int32 if num_splits else torch.int64)
    cache = torch.randn(num_blocks, block_size, latent + rope, generator=gen).to(dtype)  # [N, S, C + R]
    query = torch.randn(batch, heads, latent + rope, generator=gen).to(dtype)  # [B, H, C + R]
    scale = 0.1
    out = torch.full((batch, heads, latent), float("nan"), dtype=dtype)
    ours = mla_decode.paged_mla_decode(
        query, cache, tables, context_lens, latent, scale, num_splits=num_splits, block_h=block_h, out=out
    )
    expected = reference.paged_mla_decode(query.float(), cache.float(), tables.long(), context_lens, latent, scale)
    assert ours is out
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(ours.float(), expected, atol=tol, rtol=tol)


def test_paged_mla_decode_empty_batch():
    cache = torch.randn(4, 64, 576)
    out = mla_decode.paged_mla_decode(
        torch.randn(0, 16, 576),
        cache,
        torch.zeros(0, 2, dtype=torch.int64),
        torch.zeros(0, dtype=torch.int64),
        512,
        1.0,
    )
    assert out.shape == (0, 16, 512)


# ---- full size on a GPU, through the dispatch -----------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dispatch_at_r1_shapes_on_gpu():
    from ponder import kernels

    gen = torch.Generator(device="cuda").manual_seed(0)
    batch, heads, latent, rope, block_size, num_blocks = 8, 128, 512, 64, 64, 1024
    lens = torch.randint(1, 4096, (batch,), device="cuda", generator=gen)
    tables = torch.randperm(num_blocks, device="cuda", generator=gen)[: batch * 64].view(batch, 64)
    cache = torch.randn(num_blocks, block_size, latent + rope, device="cuda", generator=gen).bfloat16()
    slots = (tables[:, 0] * block_size).clone()
    slots[0] = -1
    rows = torch.randn(batch, latent + rope, device="cuda", generator=gen).bfloat16()
    expected_cache = cache.clone()
    reference.store_latent_cache(rows, expected_cache, slots)
    kernels.store_latent_cache(rows, cache, slots)
    torch.testing.assert_close(cache, expected_cache, atol=0, rtol=0)
    query = torch.randn(batch, heads, latent + rope, device="cuda", generator=gen).bfloat16()
    ours = kernels.paged_mla_decode(query, cache, tables, lens, latent, 0.1)
    expected = reference.paged_mla_decode(query.float(), cache.float(), tables, lens, latent, 0.1)
    torch.testing.assert_close(ours.float(), expected, atol=2e-2, rtol=2e-2)
    k_cache = torch.randn(num_blocks, block_size, 8, 128, device="cuda", generator=gen).bfloat16()
    v_cache = torch.randn_like(k_cache)
    query = torch.randn(batch, 64, 128, device="cuda", generator=gen).bfloat16()
    ours = kernels.paged_decode_attention(query, k_cache, v_cache, tables, lens, 128**-0.5)
    expected = reference.paged_decode_attention(
        query.float(), k_cache.float(), v_cache.float(), tables, lens, 128**-0.5
    )
    torch.testing.assert_close(ours.float(), expected, atol=2e-2, rtol=2e-2)
