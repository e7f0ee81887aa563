"""Rotary position embedding with the rope scalings the supported configs use (linear, llama3,
YaRN). cos/sin are precomputed for every position once. Llama checkpoints pair dims (i, i + R/2)
(rotate-half); DeepSeek checkpoints pair adjacent dims (2i, 2i + 1) (`interleaved`)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ponder.engine.errors import ModelLoadError


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


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_inv_freq(rotary_dim: int, theta: float, scaling: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate the low frequencies by `factor`, keep the high ones, blend the band between
    (beta_fast..beta_slow rotations over the original context) by a linear ramp. Returns the
    frequencies and the cos/sin magnitude factor (1 when mscale == mscale_all_dim, as in R1,
    whose magnitude correction lives in the softmax scale instead)."""
    factor = scaling["factor"]
    original = scaling["original_max_position_embeddings"]
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:  # the dim that turns `rotations` times over the context
        return rotary_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    # The same float32 expressions as transformers, so frequencies agree bit for bit.
    pos_freqs = theta ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim)  # [R/2]
    ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp  # 1: keep the original frequency, 0: interpolate it
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def rope_frequencies(rotary_dim: int, theta: float, scaling: dict[str, Any] | None) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [R/2], cos/sin magnitude factor) for the config's rope scaling."""
    inv_freq = default_inv_freq(rotary_dim, theta)
    scaling = scaling or {}
    rope_type = scaling.get("rope_type")
    if rope_type is None:
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / scaling["factor"], 1.0
    if rope_type == "llama3":
        return llama3_inv_freq(inv_freq, scaling), 1.0
    if rope_type == "yarn":
        return yarn_inv_freq(rotary_dim, theta, scaling)
    raise ModelLoadError(f"rope_type {rope_type!r} is not supported for this model")


class RotaryEmbedding(nn.Module):
    cos: torch.Tensor  # [P, R] buffers, registered in __init__
    sin: torch.Tensor

    def __init__(
        self,
        rotary_dim: int,
        max_position: int,
        inv_freq: torch.Tensor,
        attention_scaling: float = 1.0,
        interleaved: bool = False,
    ):
        super().__init__()
        self.interleaved = interleaved
        positions = torch.arange(max_position, dtype=torch.float)
        freqs = positions[:, None] * inv_freq[None, :]  # [P, R/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, R]
        self.register_buffer("cos", emb.cos() * attention_scaling, persistent=False)
        self.register_buffer("sin", emb.sin() * attention_scaling, persistent=False)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # positions [T]; x [T, heads, R] (q and k heads together) -> rotated [T, heads, R]
        half = x.shape[-1] // 2
        if self.interleaved:  # pairs (2i, 2i+1) -> (i, i + R/2); q and k get the same layout
            x = torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)
        cos = self.cos[positions, :half].unsqueeze(1).to(x.dtype)  # [T, 1, R/2]; both halves are equal
        sin = self.sin[positions, :half].unsqueeze(1).to(x.dtype)
        x1, x2 = x[..., :half], x[..., half:]
        # = x * cos + rotate_half(x) * sin, term by term, in half the memory traffic
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
