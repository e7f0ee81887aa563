"""Linear layers whose weights may be packed from several checkpoint tensors.

A packed layer (q|k|v, gate|up) runs one matmul instead of several; each checkpoint tensor is
copied into its row range by `weight_loader`, which checks the shape so a mismatched checkpoint
fails with a clear message instead of a broadcast error deep in torch.

With `fp8=True` (EngineConfig.fp8_weights keep mode, docs/architecture.md#fp8-weights) the weight stays float8_e4m3fn
[out, in] beside its fp32 `weight_scale_inv` [ceil(out/128), ceil(in/128)], and the layer runs
`kernels.fp8_linear`. A packed FP8 layer needs every shard but the last to be a whole number of
128-row blocks (`fp8_packable`), so that each shard's scale rows land in their own block rows.

Tensor parallelism (docs/architecture.md#tensor-parallelism): `ColumnParallelLinear` splits the
output rows over the ranks (each rank computes its slice of y, no communication; a packed layer
splits every shard), `RowParallelLinear` splits the input columns and all-reduces the partial
sums. The weight loader narrows each checkpoint tensor to the rank's slice (FP8 scales by block),
so a rank holds only its share. With one rank both are the plain `Linear`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ponder import kernels
from ponder.engine.errors import ConfigError
from ponder.engine.runtime.distributed import all_reduce, kv_heads_per_rank, tp_rank, tp_size
from ponder.engine.runtime.fp8 import BLOCK_SIZE, FP8_DTYPE, dequantize_block_fp8, scale_shape

# shard (None for an unpacked weight) -> (start, size, full size) along the split dim of the checkpoint tensor
TPSlices = dict[Any, tuple[int, int, int]]


class ShapeMismatch(ValueError):
    pass


def copy_checked(target: torch.Tensor, loaded: torch.Tensor) -> None:
    """A checkpoint tensor into its place, refused with a clear message when the shapes differ."""
    if tuple(loaded.shape) != tuple(target.shape):
        raise ShapeMismatch(f"expected shape {tuple(target.shape)}, checkpoint has {tuple(loaded.shape)}")
    target.copy_(loaded)


def set_weight_attrs(param: nn.Parameter, **attrs: Any) -> None:
    """Tag a parameter with what runtime.loader reads back from it (`weight_loader`, `expected_shards`)."""
    for name, value in attrs.items():
        setattr(param, name, value)


def fp8_packable(shard_sizes: list[int], block: int = BLOCK_SIZE) -> bool:
    """Whether FP8 weights of these row counts can share one block-scaled weight."""
    return all(size % block == 0 for size in shard_sizes[:-1])


class Linear(nn.Module):
    """y = x W^T (+ b), W: [out, in]. `shard_sizes` names the row blocks of a packed weight.
    Replicated: every rank holds the whole weight."""

    tp_dim: int | None = None  # the weight dim split over ranks: 0 rows (column-parallel), 1 columns (row-parallel)

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
        self.tp_rank, self.tp_size = 0, 1
        self.tp_slices: TPSlices = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x, self.bias)

    def _matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.fp8:
            assert self.weight_scale_inv is not None  # fp8 layers always have their scales
            return kernels.fp8_linear(x, self.weight, self.weight_scale_inv, bias)
        return kernels.linear(x, self.weight, bias, self.packed)

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
        loaded = self._rank_slice(param, loaded, shard)
        target = param.data
        if shard is not None:
            offset, size = self.shard_offsets[shard]
            if param is self.weight_scale_inv:  # the shard's block rows (fp8_packable aligns them)
                offset, size = offset // BLOCK_SIZE, -(-size // BLOCK_SIZE)
            target = target.narrow(0, offset, size)
        copy_checked(target, loaded)

    def _rank_slice(self, param: nn.Parameter, loaded: torch.Tensor, shard: str | None) -> torch.Tensor:
        """This rank's part of a checkpoint tensor (all of it when replicated)."""
        if self.tp_size == 1 or (param is self.bias and self.tp_dim == 1):
            return loaded  # one rank holds it all; a row-parallel bias is added once, after the sum
        assert self.tp_dim is not None  # only the parallel subclasses split over ranks
        start, size, full = self.tp_slices[shard]
        if param is self.weight_scale_inv:  # whole blocks (_set_tp refused anything else)
            start, size, full = start // BLOCK_SIZE, -(-size // BLOCK_SIZE), -(-full // BLOCK_SIZE)
        return narrow_checked(loaded, self.tp_dim, start, size, full)

    def _set_tp(self, slices: TPSlices) -> None:
        """Record this rank's slices; FP8 weights may only be split on whole 128 blocks."""
        self.tp_rank, self.tp_size, self.tp_slices = tp_rank(), tp_size(), slices
        for shard, (start, size, full) in slices.items():
            if self.fp8 and (start % BLOCK_SIZE or (size % BLOCK_SIZE and start + size != full)):
                raise ConfigError(
                    f"FP8 weights cannot be split over {self.tp_size} ranks: shard {shard} rows/columns "
                    f"[{start}, {start + size}) of {full} cut a {BLOCK_SIZE}-wide scale block"
                )


class ColumnParallelLinear(Linear):
    """Output rows split over the ranks: y_r = x W_r^T (+ b_r), W_r [out / N, in]; no communication.
    `shard_sizes` are the full sizes; each shard is split evenly, unless `shard_slices` gives each
    shard's (start, size, full size) on this rank (replicated kv heads)."""

    tp_dim = 0

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        shard_sizes: dict[str, int] | None = None,
        fp8: bool = False,
        shard_slices: TPSlices | None = None,
    ) -> None:
        rank, size = tp_rank(), tp_size()
        full_sizes: dict[Any, int] = dict(shard_sizes) if shard_sizes else {None: out_features}
        slices = shard_slices or {s: (rank * n // size, n // size, n) for s, n in full_sizes.items()}
        local = {s: n for s, (_, n, _) in slices.items()}
        super().__init__(in_features, sum(local.values()), bias, local if shard_sizes else None, fp8)
        self._set_tp(slices)


class QKVParallelLinear(ColumnParallelLinear):
    """Packed q|k|v, split by heads: each rank its H / N query heads and K / N kv heads, or, with
    fewer kv heads than ranks, the one kv head its query heads share (replicated)."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False):
        rank, size = tp_rank(), tp_size()
        heads, kv_heads = num_heads // size, kv_heads_per_rank(num_kv_heads, size)
        q_slice = (rank * heads * head_dim, heads * head_dim, num_heads * head_dim)
        kv_slice = ((rank * num_kv_heads // size) * head_dim, kv_heads * head_dim, num_kv_heads * head_dim)
        super().__init__(
            hidden_size,
            (heads + 2 * kv_heads) * head_dim,
            bias,
            shard_sizes={"q": num_heads * head_dim, "k": num_kv_heads * head_dim, "v": num_kv_heads * head_dim},
            shard_slices={"q": q_slice, "k": kv_slice, "v": kv_slice},
        )


class RowParallelLinear(Linear):
    """Input columns split over the ranks: y = sum_r x_r W_r^T (+ b), W_r [out, in / N]. The sum is one
    all-reduce, left to the caller with `reduce_results=False` (to sum several partial outputs once)."""

    tp_dim = 1

    def __init__(
        self, in_features: int, out_features: int, bias: bool = False, fp8: bool = False, reduce_results: bool = True
    ) -> None:
        rank, size = tp_rank(), tp_size()
        super().__init__(in_features // size, out_features, bias, fp8=fp8)
        self.reduce_results = reduce_results
        self._set_tp({None: (rank * (in_features // size), in_features // size, in_features)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._matmul(x, self.bias if self.tp_rank == 0 else None)  # the bias once in the sum
        return all_reduce(y, self.tp_size) if self.reduce_results else y


def narrow_checked(loaded: torch.Tensor, dim: int, start: int, size: int, full: int) -> torch.Tensor:
    """`loaded[start:start + size]` along `dim`, refused when the checkpoint's dim is not `full`."""
    if loaded.dim() <= dim or loaded.shape[dim] != full:
        raise ShapeMismatch(
            f"expected {full} along dim {dim} (to split over ranks), checkpoint has {tuple(loaded.shape)}"
        )
    return loaded.narrow(dim, start, size)


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard: str | None = None) -> None:
    copy_checked(param.data, loaded)
