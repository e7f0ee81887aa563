"""Batched sampling: greedy rows by argmax; the others by temperature, top-k, top-p and min_p, then one
draw by the exponential race (argmax of p / E, E ~ Exp(1)), which equals sampling from p.

Each seeded request draws its noise from its own generator, so its tokens do not depend on
which other requests share the batch.

Speculative decoding verifies a draft token d per row with the speculative-sampling rule for a
deterministic draft (the drafter proposes its argmax, so q is one-hot at d): accept d with
probability p(d); otherwise emit a draw from p with d taken out, renormalised. Every row's token is
then distributed exactly as p: P(d) = p(d), and P(x) = (1 - p(d)) p(x) / (1 - p(d)) = p(x) for
x != d. Greedy rows accept d exactly when it is the argmax. One noise row serves both draws: the
uniform u = exp(-E[d]) decides d, and the race over the other tokens' E (independent of E[d])
draws the replacement.
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
        draft_token_ids: torch.Tensor | None = None,  # [B]; -1 = no draft in that row
        min_ps: torch.Tensor | None = None,  # [B]; 0 = off; None: no row uses it
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (tokens [B] int64, accepted [B] bool). Where a row's draft is accepted its token is the
        draft; elsewhere it is the row's draw (from p without the rejected draft)."""
        if draft_token_ids is None:
            draft_token_ids = torch.full(temperatures.shape, -1, dtype=torch.long, device=logits.device)
        has_draft = draft_token_ids >= 0
        draft = draft_token_ids.clamp(min=0)[:, None]  # [B, 1]
        greedy_accepts = has_draft & (logits.argmax(dim=-1) == draft_token_ids)
        greedy = without(logits, draft, has_draft, float("-inf")).argmax(dim=-1)  # = argmax when rejected
        if bool((temperatures == 0).all()):
            return torch.where(greedy_accepts, draft_token_ids, greedy), greedy_accepts
        scaled = logits / torch.where(temperatures == 0, 1.0, temperatures)[:, None]
        if bool((top_ks < logits.shape[1]).any() or (top_ps < 1).any()):
            scaled = apply_top_k_top_p(scaled, top_ks, top_ps)
        if min_ps is not None:
            scaled = apply_min_p(scaled, min_ps)
        probs = scaled.softmax(dim=-1)
        noise = exponential_noise(probs, generators, shared_generator)
        uniform = torch.exp(-noise.gather(1, draft)[:, 0])  # E[d] ~ Exp(1), so exp(-E[d]) ~ U(0, 1)
        random_accepts = has_draft & (uniform < probs.gather(1, draft)[:, 0])
        sampled = (without(probs, draft, has_draft, 0.0) / noise).argmax(dim=-1)
        is_greedy = temperatures == 0
        accepted = torch.where(is_greedy, greedy_accepts, random_accepts)
        tokens = torch.where(is_greedy, greedy, sampled)
        return torch.where(accepted, draft_token_ids, tokens), accepted


def without(values: torch.Tensor, draft: torch.Tensor, has_draft: torch.Tensor, fill: float) -> torch.Tensor:
    """values [B, V] with each drafting row's draft column [B, 1] set to `fill`."""
    return torch.where(has_draft[:, None], values.scatter(1, draft, fill), values)


def apply_top_k_top_p(logits: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor) -> torch.Tensor:
    """Mask logits outside each row's top-k and top-p nucleus with -inf. The nucleus is measured in
    the row's whole distribution (before top-k). When every row has a top-k, only the best
    max(top_ks) are ranked (topk, not a sort of the vocabulary: R1's has 129,280 entries)."""
    vocab = logits.shape[1]
    k_max = int(top_ks.max())
    if k_max < vocab:
        ranked, order = logits.topk(k_max, dim=-1)  # [B, k_max], best first
    else:
        ranked, order = logits.sort(dim=-1, descending=True)  # [B, V]
    ranks = torch.arange(ranked.shape[1], device=logits.device)[None, :]
    drop = ranks >= top_ks[:, None]
    probs = torch.exp(ranked - logits.logsumexp(dim=-1, keepdim=True))  # of the whole row
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the better tokens
    drop |= mass_before >= top_ps[:, None]  # keeps at least the best token
    ranked = ranked.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter_(1, order, ranked)


def apply_min_p(logits: torch.Tensor, min_ps: torch.Tensor) -> torch.Tensor:
    """Mask logits [B, V] (after temperature) whose probability is below min_ps [B] times the row's
    top probability with -inf: transformers' MinPLogitsWarper, in its place after top-k/top-p. The
    top token always stays, and a token's ratio to it is the same before and after their masks, so
    this keeps exactly their survivors that pass min_p on the unmasked distribution."""
    probs = logits.softmax(dim=-1)  # [B, V]
    threshold = min_ps[:, None] * probs.amax(dim=-1, keepdim=True)  # [B, 1]
    return logits.masked_fill(probs < threshold, float("-inf"))


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


def effective_top_k(top_k: int, vocab_size: int) -> int:
    """top_k as the sampler takes it: off (-1) and anything beyond the vocabulary mean all of it."""
    return min(top_k, vocab_size) if top_k > 0 else vocab_size
