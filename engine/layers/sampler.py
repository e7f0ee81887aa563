"""Batched sampling: greedy rows by argmax; the others by temperature, top-k and top-p, then one
draw by the exponential race (argmax of p / E, E ~ Exp(1)), which equals sampling from p.

Each seeded request draws its noise from its own generator, so its tokens do not depend on
which other requests share the batch.
"""

from __future__ import annotations

import torch
from torch import nn


class Sampler(nn.Module):
    def forward(
        self,
        logits: torch.Tensor,  # [B, V] float32
        temperatures: torch.Tensor,  # [B]; 0 = greedy
        top_ps: torch.Tensor,  # [B]
        top_ks: torch.Tensor,  # [B]; vocab size = off
        generators: list[torch.Generator | None],  # per row; None = the shared stream
        shared_generator: torch.Generator | None = None,
    ) -> torch.Tensor:  # [B] int64
        greedy = logits.argmax(dim=-1)
        if bool((temperatures == 0).all()):
            return greedy
        scaled = logits / torch.where(temperatures == 0, 1.0, temperatures)[:, None]
        if bool((top_ks < logits.shape[1]).any() or (top_ps < 1).any()):
            scaled = apply_top_k_top_p(scaled, top_ks, top_ps)
        probs = scaled.softmax(dim=-1)
        noise = exponential_noise(probs, generators, shared_generator)
        sampled = (probs / noise).argmax(dim=-1)
        return torch.where(temperatures == 0, greedy, sampled)


def apply_top_k_top_p(logits: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor) -> torch.Tensor:
    """Mask logits outside each row's top-k and top-p nucleus with -inf."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [B, V]
    ranks = torch.arange(logits.shape[1], device=logits.device)[None, :]
    drop = ranks >= top_ks[:, None]
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the better tokens
    drop |= mass_before >= top_ps[:, None]  # keeps at least the best token
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def exponential_noise(
    probs: torch.Tensor, generators: list[torch.Generator | None], shared_generator: torch.Generator | None
) -> torch.Tensor:
    noise = torch.empty_like(probs)
    shared = [i for i, g in enumerate(generators) if g is None]
    if shared:
        noise[shared] = torch.empty(len(shared), probs.shape[1], device=probs.device).exponential_(
            generator=shared_generator
        )
    for i, generator in enumerate(generators):
        if generator is not None:
            noise[i].exponential_(generator=generator)
    return noise
