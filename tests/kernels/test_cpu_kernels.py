"""The C++ CPU kernels against the torch reference (they must build here: a silent fallback would
hide a broken kernel behind a slow one)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from ponder import kernels
from ponder.kernels import cpu, reference


@pytest.fixture(scope="module")
def ops():
    built = cpu.load()
    assert built is not None, "the CPU kernels failed to build (see the ponder.kernels warning)"
    return built


def test_a_build_killed_midway_does_not_hold_up_the_next_load(ops, tmp_path):
    # torch's build lock is a file: a builder killed mid-build (a test timeout, a Ctrl-C) leaves it,
    # and every later load used to wait for it forever. A finished build copied into a fresh root,
    # plus such a file: the next load must come back at once with the kernels.
    root = tmp_path / "extensions"
    built = shutil.copytree(cpu.build_directory(), root / cpu.extension_name())
    (built / "lock").touch()
    code = "from ponder.kernels import cpu; assert cpu.load() is not None"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(root)}
    subprocess.run([sys.executable, "-c", code], env=env, timeout=240, check=True)
    assert not (built / "lock").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(9, 3, 64), (4, 4, 32), (16, 2, 128)])
def test_paged_decode_matches_reference(ops, dtype, heads, kv_heads, dim):
    gen = torch.Generator().manual_seed(heads * dim)
    block_size, num_blocks, batch = 16, 64, 6
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=gen).to(dtype)
    context_lens = torch.tensor([1, 15, 16, 17, 100, 203])
    width = -(-int(context_lens.max()) // block_size)
    tables = torch.stack([torch.randperm(num_blocks, generator=gen)[:width] for _ in range(batch)])
    query = (3 * torch.randn(batch, heads, dim, generator=gen)).to(dtype)
    scale = dim**-0.5
    ours = ops.paged_decode_attention(query, k_cache, v_cache, tables, context_lens, scale)
    expected = reference.paged_decode_attention(
        query.float(), k_cache.float(), v_cache.float(), tables, context_lens, scale
    )
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ours.float(), expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_lora_rank", "rope_dim"), [(4, 64, 16), (8, 128, 32), (16, 512, 64)])
def test_paged_mla_decode_matches_reference(ops, dtype, heads, kv_lora_rank, rope_dim):
    gen = torch.Generator().manual_seed(kv_lora_rank)
    block_size, num_blocks, batch = 16, 32, 5
    cache = torch.randn(num_blocks, block_size, kv_lora_rank + rope_dim, generator=gen).to(dtype)
    context_lens = torch.tensor([1, 16, 17, 40, 130])
    width = -(-int(context_lens.max()) // block_size)
    tables = torch.stack([torch.randperm(num_blocks, generator=gen)[:width] for _ in range(batch)])
    query = torch.randn(batch, heads, kv_lora_rank + rope_dim, generator=gen).to(dtype)
    scale = 0.1
    ours = kernels.paged_mla_decode(query, cache, tables, context_lens, kv_lora_rank, scale)
    expected = reference.paged_mla_decode(query.float(), cache.float(), tables, context_lens, kv_lora_rank, scale)
    assert ours.shape == (batch, heads, kv_lora_rank)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ours.float(), expected, atol=tolerance, rtol=tolerance)


def test_dispatch_uses_the_kernel_on_cpu(ops, monkeypatch):
    calls = []
    monkeypatch.setattr(reference, "paged_decode_attention", lambda *a: calls.append(a))
    q = torch.randn(1, 2, 16)
    cache = torch.randn(2, 16, 2, 16)
    out = kernels.paged_decode_attention(q, cache, cache, torch.tensor([[0]]), torch.tensor([3]), 0.25)
    assert out.shape == (1, 2, 16) and not calls


def test_bad_inputs_raise(ops):
    q = torch.randn(1, 3, 16)
    cache = torch.randn(2, 16, 2, 16)
    with pytest.raises(RuntimeError, match="multiple of kv heads"):
        ops.paged_decode_attention(q, cache, cache, torch.tensor([[0]]), torch.tensor([3]), 0.25)
    with pytest.raises(RuntimeError, match="int64"):
        ops.paged_decode_attention(
            torch.randn(1, 2, 16), cache, cache, torch.tensor([[0]], dtype=torch.int32), torch.tensor([3]), 0.25
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_prefill_matches_reference(ops, dtype):
    gen = torch.Generator().manual_seed(7)
    heads, kv_heads, dim, block_size, num_blocks = 6, 2, 32, 16, 64
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=gen).to(dtype)
    chunks = [(0, 7), (20, 13), (0, 64), (31, 1), (5, 40)]  # (cached prefix, new tokens)
    context_lens = torch.tensor([p + n for p, n in chunks])
    width = -(-int(context_lens.max()) // block_size)
    tables = torch.stack([torch.randperm(num_blocks, generator=gen)[:width] for _ in chunks])
    starts = torch.tensor([0, *torch.cumsum(torch.tensor([n for _, n in chunks]), 0).tolist()])
    query = torch.randn(int(starts[-1]), heads, dim, generator=gen).to(dtype)
    scale = dim**-0.5
    ours = ops.paged_prefill_attention(query, k_cache, v_cache, tables, starts, context_lens, scale)
    expected = reference.paged_prefill_attention(
        query.float(), k_cache.float(), v_cache.float(), tables, starts, context_lens, 64, scale
    )
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ours.float(), expected, atol=tolerance, rtol=tolerance)


def test_paged_prefill_over_a_long_prefix_goes_in_row_blocks(ops):
    """600 new tokens over a 60,000-token prefix: the 36M-element causal mask exceeds the kernel's
    32M block, so the rows go through in two blocks (553 + 47), each over the keys it can see."""
    gen = torch.Generator().manual_seed(8)
    prefix, new, block_size = 60_000, 600, 16
    num_blocks = -(-(prefix + new) // block_size)
    k_cache = torch.randn(num_blocks, block_size, 1, 16, generator=gen)
    v_cache = torch.randn(num_blocks, block_size, 1, 16, generator=gen)
    table = torch.randperm(num_blocks, generator=gen)[None]  # [1, M]
    query = torch.randn(new, 2, 16, generator=gen)  # two heads on one kv head
    ours = ops.paged_prefill_attention(
        query, k_cache, v_cache, table, torch.tensor([0, new]), torch.tensor([prefix + new]), 0.25
    )
    keys = k_cache[table[0]].view(-1, 16)[: prefix + new]  # [L, D]
    values = v_cache[table[0]].view(-1, 16)[: prefix + new]
    visible = torch.arange(prefix + new)[None, :] <= torch.arange(new)[:, None] + prefix  # [Q, L]
    expected = torch.nn.functional.scaled_dot_product_attention(
        query.transpose(0, 1), keys.expand(2, -1, -1), values.expand(2, -1, -1), attn_mask=visible, scale=0.25
    ).transpose(0, 1)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden", [576, 100])  # a multiple of 16, and one with a scalar tail
def test_rms_norm_matches_reference(ops, dtype, hidden):
    gen = torch.Generator().manual_seed(hidden)
    x = (3 * torch.randn(37, hidden, generator=gen)).to(dtype)
    residual = torch.randn(37, hidden, generator=gen).to(dtype)
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype)
    exact = 1e-6 if dtype == torch.float32 else 0
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    expected_plain = reference.rms_norm(x, weight, 1e-5)
    torch.testing.assert_close(ops.rms_norm(x, weight, 1e-5), expected_plain, atol=tolerance, rtol=tolerance)
    ours_residual, ref_residual = residual.clone(), residual.clone()
    ours = ops.fused_add_rms_norm(x, ours_residual, weight, 1e-5)
    expected = reference.rms_norm(x, weight, 1e-5, ref_residual)
    torch.testing.assert_close(ours_residual, ref_residual, atol=exact, rtol=exact)  # the add rounds alike
    torch.testing.assert_close(ours, expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [1536, 40])
def test_silu_and_mul_matches_reference(ops, dtype, width):
    gen = torch.Generator().manual_seed(width)
    x = (4 * torch.randn(9, 2 * width, generator=gen)).to(dtype)
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(ops.silu_and_mul(x), reference.silu_and_mul(x), atol=tolerance, rtol=tolerance)
