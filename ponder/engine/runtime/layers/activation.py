"""SiLU-and-mul on a fused gate|up projection."""

from __future__ import annotations

import torch
from torch import nn

from ponder import kernels


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.silu_and_mul(x)  # [T, 2I] -> [T, I]
