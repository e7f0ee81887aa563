"""Linear layers whose weights may be packed from several checkpoint tensors.

A packed layer (q|k|v, gate|up) runs one matmul instead of several; each checkpoint tensor is
copied into its row range by `weight_loader`, which checks the shape so a mismatched checkpoint
fails with a clear message instead of a broadcast error deep in torch.

With `fp8=True` (EngineConfig.fp8_weights keep mode, docs/architecture.md#fp8-weights) the weight stays float8_e4m3fn
[out, in] beside its fp32 `weight_scale_inv` [ceil(out/128), ceil(in/128)], and the layer runs
`kernels.fp8_linear`. A packed FP8 layer needs every shard but the last to be a whole number of
128-row blocks (`fp8_packable`), so that each shard's scale rows land in their own block rows.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import kernels
from engine.fp8 import BLOCK_SIZE, FP8_DTYPE, dequantize_block_fp8, scale_shape


class ShapeMismatch(ValueError):
    pass


def copy_checked(target: torch.Tensor, loaded: torch.Tensor) -> None:
    """A checkpoint tensor into its place, refused with a clear message when the shapes differ."""
    if tuple(loaded.shape) != tuple(target.shape):
        raise ShapeMismatch(f"expected shape {tuple(target.shape)}, checkpoint has {tuple(loaded.shape)}")
    target.copy_(loaded)


def set_weight_attrs(param: nn.Parameter, **attrs: Any) -> None:
    """Tag a parameter with what engine.loader reads back from it (`weight_loader`, `expected_shards`)."""
    for name, value in attrs.items():
        setattr(param, name, value)


def fp8_packable(shard_sizes: list[int], block: int = BLOCK_SIZE) -> bool:
    """Whether FP8 weights of these row counts can share one block-scaled weight."""
    return all(size % block == 0 for size in shard_sizes[:-1])


class Linear(nn.Module):
    """y = x W^T (+ b), W: [out, in]. `shard_sizes` names the row blocks of a packed weight."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        shard_sizes: dict[str, int] | None = None,
        fp8: bool = False,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.fp8 = fp8
        self.weight_scale_inv: nn.Parameter | None  # set exactly when fp8
        if fp8:
            assert fp8_packable(list((shard_sizes or {}).values())), "FP8 shards must align to the scale blocks"
            self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE), requires_grad=False)
            self.weight_scale_inv = nn.Parameter(
                torch.empty(scale_shape((out_features, in_features)), dtype=torch.float32), requires_grad=False
            )
        else:
            self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
            self.weight_scale_inv = None
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.shard_offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for shard, size in (shard_sizes or {}).items():
            self.shard_offsets[shard] = (offset, size)
            offset += size
        assert not shard_sizes or offset == out_features, "shards must cover the output rows"
        for param in self.parameters():
            set_weight_attrs(param, weight_loader=self.weight_loader)
        self.packed: torch.Tensor | None = None  # the weight in the kernel's layout, once loaded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8:
            assert self.weight_scale_inv is not None  # fp8 layers always have their scales
            return kernels.fp8_linear(x, self.weight, self.weight_scale_inv, self.bias)
        return kernels.linear(x, self.weight, self.bias, self.packed)

    def prepack(self) -> None:
        """Called once the weights are loaded (and never changed again)."""
        if not self.fp8:
            self.packed = kernels.prepack_linear(self.weight)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight as `dtype` (dequantised from FP8 in keep mode)."""
        if not self.fp8:
            return self.weight.to(dtype)
        assert self.weight_scale_inv is not None  # fp8 layers always have their scales
        return dequantize_block_fp8(self.weight, self.weight_scale_inv, BLOCK_SIZE, dtype)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard: str | None = None) -> None:
        target = param.data
        if shard is not None:
            offset, size = self.shard_offsets[shard]
            if param is self.weight_scale_inv:  # the shard's block rows (fp8_packable aligns them)
                offset, size = offset // BLOCK_SIZE, -(-size // BLOCK_SIZE)
            target = target.narrow(0, offset, size)
        copy_checked(target, loaded)


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard: str | None = None) -> None:
    copy_checked(param.data, loaded)
