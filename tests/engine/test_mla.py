"""MLA attention: the absorbed decode path (W_UK folded into the query, attention over the latent
cache as one shared head, W_UV after) equals the naive path that expands per-head K/V."""

from __future__ import annotations

import pytest
import torch

from engine.config import ModelConfig
from engine.layers.attention import AttentionMetadata
from engine.layers.mla import MLAAttention
from engine.layers.rotary import RotaryEmbedding, rope_frequencies
from engine.models.deepseek_v3 import softmax_scale

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


@pytest.mark.parametrize("context_lens", [[1, 7, 13], [16, 3]])
def test_absorbed_decode_equals_expanded(context_lens):
    layer = mla_layer()
    gen = torch.Generator().manual_seed(1)
    batch, blocks_per_seq = len(context_lens), 4
    layer.kv_cache = torch.randn(batch * blocks_per_seq, BLOCK, C + R, generator=gen)  # random cached latents
    tables = torch.arange(batch * blocks_per_seq).view(batch, blocks_per_seq).flip(1)  # non-contiguous blocks
    q_nope, q_pe = torch.randn(batch, HEADS, DN, generator=gen), torch.randn(batch, HEADS, R, generator=gen)
    meta = AttentionMetadata(
        slot_mapping=torch.empty(0, dtype=torch.int64),
        block_size=BLOCK,
        num_decode_tokens=batch,
        decode_block_tables=tables,
        decode_context_lens=torch.tensor(context_lens),
        prefill_block_tables=tables[:0],
        prefill_query_start_loc=torch.zeros(1, dtype=torch.int64),
        prefill_context_lens=torch.zeros(0, dtype=torch.int64),
        max_prefill_query_len=0,
    )
    absorbed = layer.decode(q_nope, q_pe, meta)  # [B, H, Dv]
    for seq, context_len in enumerate(context_lens):
        latent = layer._context_latent(tables[seq], context_len, BLOCK)  # [L, C + R]
        query = torch.cat([q_nope[seq], q_pe[seq]], dim=-1)[None]  # [1, H, Dn + R]
        expanded = layer._expanded_attention(query, latent)[0]  # [H, Dv]
        torch.testing.assert_close(absorbed[seq], expanded, atol=1e-4, rtol=0)


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


def test_prefill_in_row_blocks_equals_one_block(monkeypatch):
    layer = mla_layer()
    gen = torch.Generator().manual_seed(2)
    latent, query = torch.randn(40, C + R, generator=gen), torch.randn(13, HEADS, DN + R, generator=gen)
    whole = layer._expanded_attention(query, latent)  # 27 cached + 13 new positions
    monkeypatch.setattr("engine.layers.mla.SCORE_BUDGET", HEADS * 40 * 4 * 3)  # three rows per block
    torch.testing.assert_close(layer._expanded_attention(query, latent), whole, atol=1e-6, rtol=0)
