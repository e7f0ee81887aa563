"""FP8 block quantisation as DeepSeek-V3/R1 checkpoints store it (docs/architecture.md#fp8-weights).

A linear weight [out, in] is stored as float8_e4m3fn plus a float32 `weight_scale_inv` of shape
[ceil(out/B), ceil(in/B)] (B = 128): W = fp8 * scale, one scale per BxB block. Despite its name the
scale multiplies. Edge blocks (out or in not a multiple of B) are simply smaller.
"""

from __future__ import annotations

import torch

from ponder.engine.checkpoint import FP8_BLOCK_SIZE

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448.0
BLOCK_SIZE = FP8_BLOCK_SIZE  # B: the checkpoints' block, and the one the FP8 kernels take

Block = int | tuple[int, int]


def scale_shape(shape: tuple[int, ...] | torch.Size, block_size: Block = BLOCK_SIZE) -> tuple[int, int]:
    """The `weight_scale_inv` shape for a weight of `shape`."""
    rows, cols = _block(block_size)
    out_features, in_features = shape
    return -(-out_features // rows), -(-in_features // cols)


def quantize_block_fp8(weight: torch.Tensor, block_size: Block = BLOCK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, fp32 scale): each block's scale is its amax / 448 (1 for an all-zero block)."""
    if weight.dim() != 2:
        raise ValueError(f"FP8 block quantisation needs a 2-D weight, got shape {tuple(weight.shape)}")
    if not torch.isfinite(weight).all():
        raise ValueError("cannot quantise a weight with inf or nan values")
    rows, cols = _block(block_size)
    out_features, in_features = weight.shape
    n_rows, n_cols = scale_shape(weight.shape, block_size)
    padded = torch.nn.functional.pad(weight.float(), (0, n_cols * cols - in_features, 0, n_rows * rows - out_features))
    blocks = padded.view(n_rows, rows, n_cols, cols)
    amax = blocks.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    quantized = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return quantized.view(n_rows * rows, n_cols * cols)[:out_features, :in_features].contiguous(), scale


def dequantize_block_fp8(
    weight: torch.Tensor, scale: torch.Tensor, block_size: Block = BLOCK_SIZE, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """weight.float() * scale, each scale broadcast over its block; the result in `dtype`."""
    if weight.dim() != 2:
        raise ValueError(f"FP8 weight must be 2-D, got shape {tuple(weight.shape)}")
    expected = scale_shape(weight.shape, block_size)
    if tuple(scale.shape) != expected:
        raise ValueError(
            f"scale shape {tuple(scale.shape)} does not fit weight shape {tuple(weight.shape)} "
            f"in {_block(block_size)} blocks (expected {expected})"
        )
    rows, cols = _block(block_size)
    out_features, in_features = weight.shape
    full = scale.float().repeat_interleave(rows, dim=0)[:out_features].repeat_interleave(cols, dim=1)[:, :in_features]
    return (weight.float() * full).to(dtype)


def _block(block_size: Block) -> tuple[int, int]:
    rows, cols = (block_size, block_size) if isinstance(block_size, int) else block_size
    if rows <= 0 or cols <= 0:
        raise ValueError(f"block size must be positive, got {block_size}")
    return int(rows), int(cols)
