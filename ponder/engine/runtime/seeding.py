"""Seeded sampling's noise: a seeded sample's token at a position draws from a generator seeded by
(seed, random stream, position) alone, not by how many steps this process ran or which samples
share the batch, so a job resumed elsewhere draws what it would have, and sample i of an
n-request draws what an n=1 request with sample_index=i does."""

from __future__ import annotations

import torch


def generator(device: torch.device, seed: int | None, stream: int, position: int) -> torch.Generator | None:
    """The token at `position`'s own generator; None (the shared stream) for an unseeded sample."""
    if seed is None:
        return None
    return torch.Generator(device).manual_seed(mix_seed(seed, stream, position))


def mix_seed(seed: int, stream: int, position: int) -> int:
    """A 64-bit generator seed per (seed, random stream, token position): splitmix64 of (seed,
    position), where a stream s > 0 first replaces the seed by splitmix64 of (seed, s) on another
    increment. Stream 0 (a plain request, and sample 0) is the seed itself."""
    if stream:
        seed = _splitmix64(seed + stream * 0xD1B54A32D192ED03)
    return _splitmix64(seed + (position + 1) * 0x9E3779B97F4A7C15)


def _splitmix64(z: int) -> int:
    """splitmix64's output function of a 64-bit state (taken mod 2**64)."""
    z %= 1 << 64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % (1 << 64)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % (1 << 64)
    return z ^ (z >> 31)
