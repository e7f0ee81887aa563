"""MLA attention: the absorbed paths (W_UK folded into the query, attention over the paged latent
cache as one shared head, W_UV after), decode and prefill over a cached prefix, and the expanded
prefill of fresh prompts, all equal a naive float64 MLA that expands per-head K/V."""

from __future__ import annotations

import pytest
import torch

from ponder.engine.config import ModelConfig
from ponder.engine.runtime.layers.attention import AttentionMetadata
from ponder.engine.runtime.layers.mla import MLAAttention
from ponder.engine.runtime.layers.rotary import RotaryEmbedding, rope_frequencies
from ponder.engine.runtime.models.deepseek_v3 import softmax_scale

HEADS, C, R, DN, DV, BLOCK = 4, 32, 8, 16, 12, 4


def mla_layer(seed: int = 0) -> MLAAttention:
    config = ModelConfig.from_dict(
        {
            "model_type": "deepseek_v3",
            "vocab_size": 64,
            "hidden_size": 48,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": HEADS,
            "q_lora_rank": 24,
            "kv_lora_rank": C,
            "qk_rope_head_dim": R,
            "qk_nope_head_dim": DN,
            "v_head_dim": DV,
            "rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 64, "mscale_all_dim": 1},
        }
    )
    inv_freq, magnitude = rope_frequencies(R, config.rope_theta, config.rope_scaling)
    layer = MLAAttention(config, RotaryEmbedding(R, 256, inv_freq, magnitude, interleaved=True), softmax_scale(config))
    gen = torch.Generator().manual_seed(seed)
    for param in layer.parameters():
        param.data.copy_(torch.randn(param.shape, generator=gen) / param.shape[-1] ** 0.5)
    layer.prepack()
    return layer


def naive_attention(layer: MLAAttention, q_nope, q_pe, latent: torch.Tensor) -> torch.Tensor:
    """The textbook MLA of the last Q of L positions, in float64: per-head K/V expanded from the latents
    with kv_b_proj's weight, an explicit causal mask and softmax. q_nope [Q, H, Dn], q_pe [Q, H, R],
    latent [L, C + R] -> [Q, H, Dv]."""
    q_nope, q_pe, latent = q_nope.double(), q_pe.double(), latent.double()
    context_len, query_len = latent.shape[0], q_nope.shape[0]
    w_kv = layer.kv_b_proj.weight.double().view(HEADS, DN + DV, C)
    k_nope = torch.einsum("hdc,lc->lhd", w_kv[:, :DN], latent[:, :C])  # [L, H, Dn]
    value = torch.einsum("hdc,lc->lhd", w_kv[:, DN:], latent[:, :C])  # [L, H, Dv]
    k_pe = latent[:, C:]  # [L, R], shared by the heads
    scores = torch.einsum("qhd,lhd->hql", q_nope, k_nope) + torch.einsum("qhr,lr->hql", q_pe, k_pe)
    position = torch.arange(query_len)[:, None] + context_len - query_len  # [Q, 1]
    scores = scores.masked_fill(torch.arange(context_len)[None, :] > position, float("-inf")) * layer.scale
    return torch.einsum("hql,lhd->qhd", scores.softmax(-1), value)


def cached_context(context_lens: list[int], seed: int):
    """Random latents in a paged cache (blocks out of order) and the block tables of each sequence."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = -(-max(context_lens) // BLOCK)
    num_blocks = len(context_lens) * blocks_per_seq
    cache = torch.randn(num_blocks, BLOCK, C + R, generator=gen)  # [N, S, C + R]
    tables = torch.randperm(num_blocks, generator=gen).view(len(context_lens), blocks_per_seq)  # [B, M]
    return cache, tables


def context_latent(cache: torch.Tensor, table: torch.Tensor, context_len: int) -> torch.Tensor:
    return cache[table].view(-1, C + R)[:context_len]  # [L, C + R]


def metadata(tables, decode_lens=(), prefill=()) -> AttentionMetadata:
    """prefill: (cached prefix, new tokens) per sequence, after the decodes' tables."""
    decodes = len(decode_lens)
    starts = torch.tensor([0, *torch.tensor([n for _, n in prefill], dtype=torch.int64).cumsum(0).tolist()])
    return AttentionMetadata(
        slot_mapping=torch.empty(0, dtype=torch.int64),
        block_size=BLOCK,
        num_decode_tokens=decodes,
        decode_block_tables=tables[:decodes],
        decode_context_lens=torch.tensor(decode_lens, dtype=torch.int64),
        prefill_block_tables=tables[decodes:],
        prefill_query_start_loc=starts,
        prefill_context_lens=torch.tensor([p + n for p, n in prefill], dtype=torch.int64),
        max_prefill_query_len=max((n for _, n in prefill), default=0),
    )


@pytest.mark.parametrize("context_lens", [[1, 7, 13], [16, 3]])
def test_absorbed_decode_equals_naive(context_lens):
    layer = mla_layer()
    layer.kv_cache, tables = cached_context(context_lens, seed=1)
    gen = torch.Generator().manual_seed(1)
    batch = len(context_lens)
    q_nope, q_pe = torch.randn(batch, HEADS, DN, generator=gen), torch.randn(batch, HEADS, R, generator=gen)
    absorbed = layer.decode(q_nope, q_pe, metadata(tables, decode_lens=context_lens))  # [B, H, Dv]
    for seq, context_len in enumerate(context_lens):
        latent = context_latent(layer.kv_cache, tables[seq], context_len)
        expected = naive_attention(layer, q_nope[seq, None], q_pe[seq, None], latent)[0]  # [H, Dv]
        torch.testing.assert_close(absorbed[seq].double(), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "prefill",
    [
        [(0, 5), (9, 4), (3, 1)],  # some sequences over a cached prefix: the absorbed paged path
        [(4, 9)],
        [(0, 6), (0, 1), (0, 11)],  # fresh prompts only: the expanded path
    ],
)
def test_prefill_equals_naive(prefill):
    """Each sequence's new tokens attend their cached prefix and themselves causally."""
    layer = mla_layer()
    context_lens = [p + n for p, n in prefill]
    layer.kv_cache, tables = cached_context(context_lens, seed=len(prefill))
    new_tokens = sum(n for _, n in prefill)
    gen = torch.Generator().manual_seed(3)
    q_nope, q_pe = torch.randn(new_tokens, HEADS, DN, generator=gen), torch.randn(new_tokens, HEADS, R, generator=gen)
    latent = torch.cat([context_latent(layer.kv_cache, tables[i], n)[p:] for i, (p, n) in enumerate(prefill)])
    out = layer.prefill(q_nope, q_pe, latent, metadata(tables, prefill=prefill))  # [T', H, Dv]
    start = 0
    for seq, (prefix, count) in enumerate(prefill):
        rows = slice(start, start + count)
        expected = naive_attention(
            layer, q_nope[rows], q_pe[rows], context_latent(layer.kv_cache, tables[seq], prefix + count)
        )
        torch.testing.assert_close(out[rows].double(), expected, atol=1e-4, rtol=0)
        start += count


def test_prefill_over_a_prefix_reads_the_cache_not_expanded_copies(monkeypatch):
    """With a cached prefix, kv_b_proj (the per-head expansion) is never called: the attention runs
    on the latent rows in the paged cache."""
    layer = mla_layer()
    layer.kv_cache, tables = cached_context([12], seed=4)
    calls = []
    monkeypatch.setattr(layer.kv_b_proj, "forward", lambda x: calls.append(x.shape) or torch.zeros(0))
    gen = torch.Generator().manual_seed(4)
    q_nope, q_pe = torch.randn(3, HEADS, DN, generator=gen), torch.randn(3, HEADS, R, generator=gen)
    latent = context_latent(layer.kv_cache, tables[0], 12)[9:]
    out = layer.prefill(q_nope, q_pe, latent, metadata(tables, prefill=[(9, 3)]))
    assert out.shape == (3, HEADS, DV) and calls == []


def test_cache_holds_only_the_latent():
    layer = mla_layer()
    assert layer.kv_cache_shapes(10, BLOCK) == {"kv_cache": (10, BLOCK, C + R)}  # nothing per head


def test_engine_allocates_exactly_the_latent_bytes_per_token(make_llm):
    runner = make_llm("tiny-r1").engine.model_runner
    config = make_llm("tiny-r1").engine.model_config
    latent = config.extra["kv_lora_rank"] + config.extra["qk_rope_head_dim"]  # 64 + 16
    assert runner.kv_cache_bytes_per_token == config.kv_cache_bytes_per_token(4) == 4 * latent * 4  # 4 layers, fp32
    caches = [layer.kv_cache for layer in runner.cache_layers]
    assert len(caches) == config.num_hidden_layers
    for cache in caches:
        assert cache.shape == (runner.num_blocks, runner.block_size, latent)
    total = sum(cache.numel() * cache.element_size() for cache in caches)
    assert total == runner.num_blocks * runner.block_size * runner.kv_cache_bytes_per_token
