"""Linear layers whose weights may be packed from several checkpoint tensors.

A packed layer (q|k|v, gate|up) runs one matmul instead of several; each checkpoint tensor is
copied into its row range by `weight_loader`, which checks the shape so a mismatched checkpoint
fails with a clear message instead of a broadcast error deep in torch.
"""

from __future__ import annotations

import torch
from torch import nn

import kernels


class ShapeMismatch(ValueError):
    pass


class Linear(nn.Module):
    """y = x W^T (+ b), W: [out, in]. `shard_sizes` names the row blocks of a packed weight."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        shard_sizes: dict[str, int] | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.shard_offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for shard, size in (shard_sizes or {}).items():
            self.shard_offsets[shard] = (offset, size)
            offset += size
        assert not shard_sizes or offset == out_features, "shards must cover the output rows"
        for param in self.parameters():
            param.weight_loader = self.weight_loader
        self.packed: torch.Tensor | None = None  # the weight in the kernel's layout, once loaded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.weight, self.bias, self.packed)

    def prepack(self) -> None:
        """Called once the weights are loaded (and never changed again)."""
        self.packed = kernels.prepack_linear(self.weight)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard: str | None = None) -> None:
        target = param.data
        if shard is not None:
            offset, size = self.shard_offsets[shard]
            target = target.narrow(0, offset, size)
        if tuple(loaded.shape) != tuple(target.shape):
            raise ShapeMismatch(f"expected shape {tuple(target.shape)}, checkpoint has {tuple(loaded.shape)}")
        target.copy_(loaded)


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard: str | None = None) -> None:
    if tuple(loaded.shape) != tuple(param.shape):
        raise ShapeMismatch(f"expected shape {tuple(param.shape)}, checkpoint has {tuple(loaded.shape)}")
    param.data.copy_(loaded)
