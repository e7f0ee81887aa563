"""What a Hugging Face checkpoint directory holds, as facts shared by the loader, the size counter
and the tiny-model writer: file names, the FP8 scale naming and the FP8 quantization config.
No torch, so the CLI and the API process can use it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ponder.engine.errors import ConfigError, ModelLoadError

INDEX_FILE = "model.safetensors.index.json"  # weight_map: tensor name -> shard file
SCALE_SUFFIX = "_scale_inv"  # `X.weight` is scaled by `X.weight_scale_inv`
FP8_BLOCK_SIZE = 128  # DeepSeek-V3/R1's FP8 block (128x128), and the one config.json defaults to
# Model types whose linears can hold FP8 weights (`fp8=True` layers, docs/architecture.md#fp8-weights).
FP8_MODEL_TYPES = ("deepseek_v3",)


def is_fp8_checkpoint(config: Mapping[str, Any]) -> bool:
    """Whether config.json's `quantization_config` says FP8 (block-scaled float8 linear weights)."""
    return (config.get("quantization_config") or {}).get("quant_method") == "fp8"


def fp8_block_size(config: Mapping[str, Any]) -> tuple[int, int]:
    """(rows, cols) of the FP8 weight blocks: config.json's `quantization_config.weight_block_size`,
    128x128 when absent. Anything but two positive integers is a ModelLoadError."""
    block = (config.get("quantization_config") or {}).get("weight_block_size") or [FP8_BLOCK_SIZE, FP8_BLOCK_SIZE]
    try:
        rows, cols = (int(b) for b in block)
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"config.json: quantization_config.weight_block_size {block!r} is not [rows, cols]") from e
    if rows <= 0 or cols <= 0:
        raise ModelLoadError(f"config.json: quantization_config.weight_block_size {block!r} must be positive")
    return rows, cols


def keeps_fp8(model_type: str, config: Mapping[str, Any], device_type: str, mode: str) -> bool:
    """Whether the engine runs the checkpoint's FP8 weights as stored: a checkpoint with an fp8
    `quantization_config` in 128x128 blocks (what kernels.fp8_linear takes), a model type that can
    hold FP8 weights, and mode "keep" (or "auto" on CUDA). "keep" on a checkpoint that cannot be
    kept FP8 is an error; "auto" then dequantises. `config` is config.json's fields."""
    if mode == "dequantize" or (mode == "auto" and device_type != "cuda"):
        return False
    if not is_fp8_checkpoint(config):
        return False  # nothing to keep: a bf16/fp32 checkpoint loads as always
    reason = None
    if (block := fp8_block_size(config)) != (FP8_BLOCK_SIZE, FP8_BLOCK_SIZE):
        reason = f"its FP8 blocks are {list(block)}, the FP8 kernels take [128, 128]"
    elif model_type not in FP8_MODEL_TYPES:
        reason = f"{model_type} models cannot hold FP8 weights"
    if reason is None:
        return True
    if mode == "keep":
        raise ConfigError(f"fp8_weights='keep': {reason}")
    return False
