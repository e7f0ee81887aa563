"""Llama-family decoder (Llama, Qwen2, SmolLM2, the R1 Llama/Qwen distills): GQA, optional q/k/v
bias, tied or untied embeddings, rope with the config's theta and scaling.

Dimension legend: T tokens in the step, E hidden size, H query heads, K kv heads, D head dim,
I intermediate size, V vocab.
"""

from __future__ import annotations

import torch
from torch import nn

from ponder.engine.config import ModelConfig
from ponder.engine.runtime.distributed import kv_heads_per_rank, tp_size
from ponder.engine.runtime.layers.attention import AttentionMetadata, PagedAttention
from ponder.engine.runtime.layers.linear import QKVParallelLinear, RowParallelLinear
from ponder.engine.runtime.layers.mlp import DenseMLP
from ponder.engine.runtime.layers.norm import RMSNorm
from ponder.engine.runtime.layers.rotary import RotaryEmbedding, rope_frequencies
from ponder.engine.runtime.models.base import CausalLM, DecoderLayer, DecoderModel


class LlamaAttention(nn.Module):
    """GQA over this rank's heads (H and K are per rank: all of them with one rank); o_proj sums
    the ranks' partial outputs (one all-reduce per attention block)."""

    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding) -> None:
        super().__init__()
        size = tp_size()
        self.num_heads = config.num_attention_heads // size
        self.num_kv_heads = kv_heads_per_rank(config.num_key_value_heads, size)
        self.head_dim = config.head_dim
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            self.head_dim,
            config.num_attention_heads,
            config.num_key_value_heads,
            bias=config.attention_bias,
        )
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_dim, config.hidden_size)
        self.rotary = rotary
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x).view(num_tokens, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        qk = self.rotary(positions, qkv[:, : self.num_heads + self.num_kv_heads])  # [T, H + K, D]
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)  # [T, H, D], [T, K, D]
        v = qkv[:, self.num_heads + self.num_kv_heads :]  # [T, K, D]
        out = self.attn(q, k, v, meta)  # [T, H, D]
        return self.o_proj(out.reshape(num_tokens, -1))


class LlamaDecoderLayer(DecoderLayer):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, rotary)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = DenseMLP(config.hidden_size, config.intermediate_size)


class LlamaModel(DecoderModel):
    def __init__(self, config: ModelConfig, max_position: int) -> None:
        super().__init__(config)
        inv_freq, magnitude = rope_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
        rotary = RotaryEmbedding(config.head_dim, max_position, inv_freq, magnitude)  # one table shared by all layers
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, rotary) for _ in range(config.num_hidden_layers))


class LlamaForCausalLM(CausalLM):
    packed_modules = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", "gate"),
        "up_proj": ("gate_up_proj", "up"),
    }

    def __init__(self, config: ModelConfig, max_position: int) -> None:
        super().__init__(config, LlamaModel(config, max_position))
