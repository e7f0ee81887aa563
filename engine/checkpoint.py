"""What a Hugging Face checkpoint directory holds, as facts shared by the loader, the size counter
and the tiny-model writer: file names, the FP8 scale naming and the FP8 quantization config.
No torch, so the CLI and the API process can use it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from engine.errors import ModelLoadError

INDEX_FILE = "model.safetensors.index.json"  # weight_map: tensor name -> shard file
SCALE_SUFFIX = "_scale_inv"  # `X.weight` is scaled by `X.weight_scale_inv`
FP8_BLOCK_SIZE = 128  # DeepSeek-V3/R1's FP8 block (128x128), and the one config.json defaults to


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
