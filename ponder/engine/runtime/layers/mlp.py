"""The SiLU-gated MLP of Llama-family layers, DeepSeek's dense layers and its shared experts."""

from __future__ import annotations

import torch
from torch import nn

from ponder.engine.runtime.distributed import tp_size
from ponder.engine.runtime.layers.activation import SiluAndMul
from ponder.engine.runtime.layers.linear import ColumnParallelLinear, RowParallelLinear, fp8_packable


class DenseMLP(nn.Module):
    """SiLU-gated MLP with a packed gate|up projection: the dense layers and the shared experts.
    FP8 weights whose intermediate size is not a whole number of scale blocks stay unpacked.
    Tensor-parallel along the intermediate size: gate|up column-parallel, down row-parallel with
    one all-reduce (left to the caller with `reduce_results=False`: the MoE sums once)."""

    def __init__(
        self, hidden_size: int, intermediate_size: int, fp8: bool = False, reduce_results: bool = True
    ) -> None:
        super().__init__()
        local = intermediate_size // tp_size()
        self.packed_gate_up = not fp8 or fp8_packable([local, local])
        if self.packed_gate_up:
            self.gate_up_proj = ColumnParallelLinear(
                hidden_size,
                2 * intermediate_size,
                shard_sizes={"gate": intermediate_size, "up": intermediate_size},
                fp8=fp8,
            )
        else:
            self.gate_proj = ColumnParallelLinear(hidden_size, intermediate_size, fp8=fp8)
            self.up_proj = ColumnParallelLinear(hidden_size, intermediate_size, fp8=fp8)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, fp8=fp8, reduce_results=reduce_results)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed_gate_up:
            gate_up = self.gate_up_proj(x)  # [T, 2I]
        else:
            gate_up = torch.cat([self.gate_proj(x), self.up_proj(x)], dim=-1)
        return self.down_proj(self.act(gate_up))  # [T, 2I] -> [T, I] -> [T, E] (I per rank)
