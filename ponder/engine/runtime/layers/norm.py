"""RMSNorm, optionally fused with the residual add (as vLLM does)."""

from __future__ import annotations

import torch
from torch import nn

from ponder import kernels


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        # x, residual: [T, hidden]. With a residual: returns (norm(x + residual), x + residual), and
        # the residual tensor itself holds the sum afterwards (updated in place).
        if residual is None:
            return kernels.rms_norm(x, self.weight, self.eps)
        return kernels.rms_norm(x, self.weight, self.eps, residual), residual
