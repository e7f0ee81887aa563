"""Parameters, weight bytes and KV-cache bytes from a config alone (no weights, no torch), over the
checkpoint's tensors (checkpoint_tensors.py). Per GPU under tensor parallelism: parallel_size.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ponder.engine.checkpoint import fp8_block_size, is_fp8_checkpoint
from ponder.engine.config import ModelConfig
from ponder.engine.errors import ModelLoadError
from ponder.engine.tools.checkpoint_tensors import Tensor, main_tensors, mtp_tensors, numel, stored_bytes

# Bytes per element of the dtypes a figure can be asked in (weights and KV cache).
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8": 1}


@dataclass(frozen=True)
class ModelSize:
    """What a model weighs. Main = the model the engine loads; MTP = the multi-token-prediction
    module(s) stored after it (DeepSeek-V3 `model.layers.61`), not loaded."""

    parameters: int
    mtp_parameters: int
    activated_parameters: int  # per token, main model: dense parts + top-k routed + shared experts
    weight_bytes: int  # main model, every weight at the dtype asked for (router bias fp32)
    mtp_weight_bytes: int
    weight_bytes_fp8: int | None  # main model as an FP8 block-scaled checkpoint stores it
    mtp_weight_bytes_fp8: int | None

    @property
    def total_parameters(self) -> int:
        return self.parameters + self.mtp_parameters


def model_size(config: ModelConfig, dtype_bytes: int = 2) -> ModelSize:
    """Count parameters and weight bytes (at `dtype_bytes` per weight, and as an FP8 checkpoint
    when the config says it is one); an incomplete config is a ModelLoadError."""
    try:
        main = list(main_tensors(config))
        mtp = list(mtp_tensors(config))
        activated = _activated(config, main)
        block = fp8_block_size(config.extra) if is_fp8_checkpoint(config.extra) else None
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{config.model_type} config: missing or invalid field {e}") from e
    return ModelSize(
        parameters=numel(main),
        mtp_parameters=numel(mtp),
        activated_parameters=activated,
        weight_bytes=stored_bytes(main, dtype_bytes),
        mtp_weight_bytes=stored_bytes(mtp, dtype_bytes),
        weight_bytes_fp8=stored_bytes(main, 2, block) if block else None,
        mtp_weight_bytes_fp8=stored_bytes(mtp, 2, block) if block else None,
    )


def mha_kv_cache_bytes_per_token(config: ModelConfig, dtype_bytes: int = 2) -> int:
    """What an MLA model's cache would take with full per-head K and V (the comparison MLA wins)."""
    x = config.extra
    if config.attention_kind != "mla":
        return config.kv_cache_bytes_per_token(dtype_bytes)
    k = x["qk_nope_head_dim"] + x["qk_rope_head_dim"]
    per_layer = config.num_attention_heads * (k + x["v_head_dim"])
    return config.num_hidden_layers * per_layer * dtype_bytes


def _activated(config: ModelConfig, main: list[Tensor]) -> int:
    """Each token runs num_experts_per_tok of the n_routed_experts (all routed experts have one size)."""
    routed = sum(t.numel for t in main if ".mlp.experts." in t.name)
    if not routed:
        return numel(main)
    x: dict[str, Any] = config.extra
    return numel(main) - routed + routed * int(x["num_experts_per_tok"]) // int(x["n_routed_experts"])
