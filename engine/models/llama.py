"""Llama-family decoder (Llama, Qwen2, SmolLM2, the R1 Llama/Qwen distills): GQA, optional q/k/v
bias, tied or untied embeddings, rope with the config's theta and scaling.

Dimension legend: T tokens in the step, E hidden size, H query heads, K kv heads, D head dim,
I intermediate size, V vocab.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.config import ModelConfig
from engine.layers.attention import AttentionMetadata, PagedAttention
from engine.layers.linear import Linear
from engine.layers.mlp import DenseMLP
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding, rope_frequencies


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(
            config.hidden_size,
            q_size + 2 * kv_size,
            bias=config.attention_bias,
            shard_sizes={"q": q_size, "k": kv_size, "v": kv_size},
        )
        self.o_proj = Linear(q_size, config.hidden_size)
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


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, rotary)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = DenseMLP(config.hidden_size, config.intermediate_size)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, max_position: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        inv_freq, magnitude = rope_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
        rotary = RotaryEmbedding(config.head_dim, max_position, inv_freq, magnitude)  # one table shared by all layers
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, rotary) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [T, E]
        residual = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, meta)
        x, _ = self.norm(x, residual)
        return x


class LlamaForCausalLM(nn.Module):
    # checkpoint projection -> (packed parameter, shard)
    packed_modules = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", "gate"),
        "up_proj": ("gate_up_proj", "up"),
    }

    def __init__(self, config: ModelConfig, max_position: int) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, max_position)
        self.tie_word_embeddings = config.tie_word_embeddings
        self.lm_head = Linear(config.hidden_size, config.vocab_size)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight  # one parameter, two uses

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, meta)  # [T, E]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()  # [B, E] -> [B, V]

    def checkpoint_skips(self, name: str) -> bool:
        """Tensors a checkpoint may carry that this model does not use."""
        return "rotary_emb.inv_freq" in name or (self.tie_word_embeddings and name == "lm_head.weight")
