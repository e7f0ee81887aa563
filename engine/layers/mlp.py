"""The SiLU-gated MLP of Llama-family layers, DeepSeek's dense layers and its shared experts."""

from __future__ import annotations

import torch
from torch import nn

from engine.layers.activation import SiluAndMul
from engine.layers.linear import Linear


class DenseMLP(nn.Module):
    """SiLU-gated MLP with a packed gate|up projection: the dense layers and the shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up_proj = Linear(
            hidden_size, 2 * intermediate_size, shard_sizes={"gate": intermediate_size, "up": intermediate_size}
        )
        self.down_proj = Linear(intermediate_size, hidden_size)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))  # [T, E] -> [T, 2I] -> [T, I] -> [T, E]
