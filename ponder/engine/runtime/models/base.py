"""What every decoder-only model here shares: the embed -> layers -> final norm loop with the
residual carried alongside, and the causal-LM wrapper with its (optionally tied) LM head.

Dimension legend: T tokens in the step, E hidden size, B sampled rows, V vocab.
"""

from __future__ import annotations

import torch
from torch import nn

from ponder.engine.config import ModelConfig
from ponder.engine.runtime.layers.attention import AttentionMetadata
from ponder.engine.runtime.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from ponder.engine.runtime.layers.norm import RMSNorm


class DecoderLayer(nn.Module):
    """Pre-norm attention then MLP, each around the residual; the residual add is fused into the
    next norm. Subclasses set input_layernorm, self_attn, post_attention_layernorm and mlp."""

    input_layernorm: RMSNorm
    self_attn: nn.Module  # (positions, x, meta) -> x
    post_attention_layernorm: RMSNorm
    mlp: nn.Module

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


class DecoderModel(nn.Module):
    """Subclasses build `self.layers`; each layer maps (positions, x, residual, meta) -> (x, residual)."""

    layers: nn.ModuleList

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [T, E]
        residual = None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, meta)
        x, _ = self.norm(x, residual)
        return x


class CausalLM(nn.Module):
    packed_modules: dict[str, tuple[str, str]] = {}  # checkpoint projection -> (packed parameter, shard)

    def __init__(self, config: ModelConfig, model: DecoderModel) -> None:
        super().__init__()
        self.config = config
        self.model = model
        self.tie_word_embeddings = config.tie_word_embeddings
        self.lm_head = ParallelLMHead(config.hidden_size, config.vocab_size)
        if self.tie_word_embeddings:
            # one parameter, two uses: the same vocab slice on each rank
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, meta)  # [T, E]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """[B, E] -> [B, V] fp32 logits on rank 0; None on the other tensor-parallel ranks."""
        logits = self.lm_head.logits(hidden)
        return logits.float() if logits is not None else None

    def checkpoint_skips(self, name: str) -> bool:
        """Tensors a checkpoint may carry that this model does not use."""
        return "rotary_emb.inv_freq" in name or (self.tie_word_embeddings and name == "lm_head.weight")


def packed_parameter(packed_modules: dict[str, tuple[str, str]], name: str) -> tuple[str, str | None]:
    """`...q_proj.weight` -> (`...qkv_proj.weight`, "q") for a projection packed with others."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in packed_modules:
            packed, shard = packed_modules[part]
            return ".".join([*parts[:i], packed, *parts[i + 1 :]]), shard
    return name, None
