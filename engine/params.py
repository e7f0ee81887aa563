"""Parameter counts from a config alone (for `ponder models info`; no weights, no torch)."""

from __future__ import annotations

from engine.config import ModelConfig


def count_parameters(config: ModelConfig) -> int:
    if config.attention_kind != "mha":
        from engine.errors import ModelLoadError

        raise ModelLoadError(f"parameter counting for {config.model_type} is not implemented yet")
    hidden, inter = config.hidden_size, config.intermediate_size
    q_size = config.num_attention_heads * config.head_dim
    kv_size = config.num_key_value_heads * config.head_dim
    attention = hidden * (q_size + 2 * kv_size) + q_size * hidden
    if config.attention_bias:
        attention += q_size + 2 * kv_size
    layer = attention + 3 * hidden * inter + 2 * hidden  # + the two norms
    embeddings = config.vocab_size * hidden * (1 if config.tie_word_embeddings else 2)
    return embeddings + config.num_hidden_layers * layer + hidden
