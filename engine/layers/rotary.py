"""Rotary position embedding (rotate-half layout, as in HF checkpoints), with the rope scalings
the supported configs use. cos/sin are precomputed for every position once."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from engine.errors import ModelLoadError


def default_inv_freq(rotary_dim: int, theta: float) -> torch.Tensor:
    # The same float32 expression as transformers, so positions rotate bit-for-bit alike.
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.int64).to(torch.float) / rotary_dim
    return 1.0 / (theta**exponent)  # [rotary_dim / 2]


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < old_context / high) * ~(wavelen > old_context / low)
    return torch.where(is_medium, smoothed, scaled)


def scaled_inv_freq(rotary_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    inv_freq = default_inv_freq(rotary_dim, theta)
    rope_type = (scaling or {}).get("rope_type")
    if rope_type is None:
        return inv_freq
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        return llama3_inv_freq(inv_freq, scaling)
    raise ModelLoadError(f"rope_type {rope_type!r} is not supported for this model")


class RotaryEmbedding(nn.Module):
    def __init__(self, rotary_dim: int, max_position: int, inv_freq: torch.Tensor, attention_scaling: float = 1.0):
        super().__init__()
        positions = torch.arange(max_position, dtype=torch.float)
        freqs = positions[:, None] * inv_freq[None, :]  # [P, R/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, R]
        self.register_buffer("cos", emb.cos() * attention_scaling, persistent=False)
        self.register_buffer("sin", emb.sin() * attention_scaling, persistent=False)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # positions [T]; x [T, heads, R] (q and k heads together) -> rotated [T, heads, R]
        half = x.shape[-1] // 2
        cos = self.cos[positions, :half].unsqueeze(1).to(x.dtype)  # [T, 1, R/2]; both halves are equal
        sin = self.sin[positions, :half].unsqueeze(1).to(x.dtype)
        x1, x2 = x[..., :half], x[..., half:]
        # = x * cos + rotate_half(x) * sin, term by term, in half the memory traffic
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
