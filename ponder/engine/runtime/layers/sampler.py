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

# A top-p row looks for its nucleus among its best this many tokens first (with_nucleus_bound).
NUCLEUS_CANDIDATES = 1024


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
        draft; elsewhere it is the row's draw (from p without the rejected draft).

        Rows with a top-k draw among their k best tokens only (noise for k tokens, not the whole
        vocabulary: R1's has 129,280 entries), as do top-p rows whose nucleus lies among their
        NUCLEUS_CANDIDATES best; the others from the vocabulary. Which way a row goes
        depends on its own parameters alone, so a seeded row draws the same whoever shares the batch."""
        if draft_token_ids is None:
            draft_token_ids = torch.full(temperatures.shape, -1, dtype=torch.long, device=logits.device)
        has_draft = draft_token_ids >= 0
        argmax = logits.argmax(dim=-1)  # [B]
        greedy_accepts = has_draft & (argmax == draft_token_ids)
        if bool(has_draft.any()):  # the argmax with each rejected draft left out
            argmax = without(logits, draft_token_ids.clamp(min=0)[:, None], has_draft, float("-inf")).argmax(dim=-1)
        tokens, accepted = argmax, greedy_accepts
        is_greedy = temperatures == 0
        top_ks = with_nucleus_bound(logits, temperatures, top_ps, top_ks)
        narrow = top_ks < logits.shape[1]
        for rows, draw in ((~is_greedy & narrow, draw_among_top_k), (~is_greedy & ~narrow, draw_from_vocabulary)):
            if not bool(rows.any()):
                continue
            index = rows.nonzero()[:, 0]  # [R]
            row_min_ps = None if min_ps is None else min_ps[index]
            row_generators = [generators[i] for i in index.tolist()]
            scaled = logits[index] / temperatures[index, None]  # [R, V]
            row_drafts = draft_token_ids[index]
            drawn, drawn_accepts = draw(
                scaled, top_ps[index], top_ks[index], row_generators, shared_generator, row_drafts, row_min_ps
            )
            tokens, accepted = tokens.index_put((index,), drawn), accepted.index_put((index,), drawn_accepts)
        return torch.where(accepted, draft_token_ids, tokens), accepted


def with_nucleus_bound(
    logits: torch.Tensor,  # [B, V]
    temperatures: torch.Tensor,  # [B]
    top_ps: torch.Tensor,  # [B]
    top_ks: torch.Tensor,  # [B]
) -> torch.Tensor:
    """top_ks, with NUCLEUS_CANDIDATES for each sampled top-p row without a top-k of its own whose
    nucleus lies among its NUCLEUS_CANDIDATES best tokens: the same distribution, drawn among them
    (sorting the vocabulary for the nucleus is most of a step: 2.7 s of one core for 256 rows of
    129,280; their topk 0.16 s). Whether a row's nucleus fits is the row's own: batch-invariant."""
    vocab = logits.shape[1]
    rows = (temperatures > 0) & (top_ks >= vocab) & (top_ps < 1)
    if vocab <= NUCLEUS_CANDIDATES or not bool(rows.any()):
        return top_ks
    index = rows.nonzero()[:, 0]  # [R]
    scaled = logits[index] / temperatures[index, None]  # [R, V]
    best = scaled.topk(NUCLEUS_CANDIDATES, dim=-1).values  # [R, K]
    mass = torch.exp(best - scaled.logsumexp(dim=-1, keepdim=True)).sum(dim=-1)  # [R]
    fits = index[mass >= top_ps[index]]  # past them every rank has top_p of mass before it: dropped
    return top_ks.index_put((fits,), torch.tensor(NUCLEUS_CANDIDATES, device=top_ks.device))


def draw_from_vocabulary(
    scaled: torch.Tensor,  # [R, V] logits / temperature
    top_ps: torch.Tensor,  # [R]
    top_ks: torch.Tensor,  # [R]
    generators: list[torch.Generator | None],
    shared_generator: torch.Generator | None,
    drafts: torch.Tensor,  # [R]; -1 = none
    min_ps: torch.Tensor | None,  # [R]
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (token ids [R], drafts accepted [R]): one exponential race over the whole vocabulary."""
    if bool((top_ps < 1).any()):
        scaled = apply_top_k_top_p(scaled, top_ks, top_ps)
    if min_ps is not None:
        scaled = apply_min_p(scaled, min_ps)
    probs = scaled.softmax(dim=-1)  # [R, V]
    return race(probs, exponential_noise(probs, generators, shared_generator), drafts)


def draw_among_top_k(
    scaled: torch.Tensor,  # [R, V] logits / temperature
    top_ps: torch.Tensor,  # [R]
    top_ks: torch.Tensor,  # [R]; each < V
    generators: list[torch.Generator | None],
    shared_generator: torch.Generator | None,
    drafts: torch.Tensor,  # [R]; -1 = none
    min_ps: torch.Tensor | None,  # [R]
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (token ids [R], drafts accepted [R]): the race among each row's k best tokens, in rank
    order. A draft outside them has probability 0: never accepted."""
    ranked, order = scaled.topk(int(top_ks.max()), dim=-1)  # [R, K], best first
    ranked = mask_ranked(ranked, scaled.logsumexp(dim=-1, keepdim=True), top_ks, top_ps)
    if min_ps is not None:
        ranked = apply_min_p(ranked, min_ps)
    probs = ranked.softmax(dim=-1)  # [R, K]
    noise = exponential_noise(probs, generators, shared_generator, lengths=top_ks.tolist())
    is_draft = order == drafts[:, None]  # [R, K]; no column where the draft is -1 or ranked out
    at = torch.where(is_draft.any(dim=-1), is_draft.int().argmax(dim=-1), -1)  # [R]: the draft's rank
    picked, accepts = race(probs, noise, at)
    return order.gather(1, picked[:, None])[:, 0], accepts


def race(probs: torch.Tensor, noise: torch.Tensor, drafts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (columns [R], drafts accepted [R]) for probs and noise [R, N] and draft columns [R] (-1 =
    none): the speculative rule of the module's docstring, one noise row for both draws."""
    has_draft = drafts >= 0
    draft = drafts.clamp(min=0)[:, None]  # [R, 1]
    uniform = torch.exp(-noise.gather(1, draft)[:, 0])  # E[d] ~ Exp(1), so exp(-E[d]) ~ U(0, 1)
    accepts = has_draft & (uniform < probs.gather(1, draft)[:, 0])
    return (without(probs, draft, has_draft, 0.0) / noise).argmax(dim=-1), accepts


def without(values: torch.Tensor, draft: torch.Tensor, has_draft: torch.Tensor, fill: float) -> torch.Tensor:
    """values [B, V] with each drafting row's draft column [B, 1] set to `fill`."""
    return torch.where(has_draft[:, None], values.scatter(1, draft, fill), values)


def apply_top_k_top_p(logits: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor) -> torch.Tensor:
    """Mask logits outside each row's top-k and top-p nucleus with -inf. The nucleus is measured in
    the row's whole distribution (before top-k). When every row has a top-k, only the best
    max(top_ks) are ranked (topk, not a sort of the vocabulary)."""
    vocab = logits.shape[1]
    k_max = int(top_ks.max())
    if k_max < vocab:
        ranked, order = logits.topk(k_max, dim=-1)  # [B, k_max], best first
    else:
        ranked, order = logits.sort(dim=-1, descending=True)  # [B, V]
    ranked = mask_ranked(ranked, logits.logsumexp(dim=-1, keepdim=True), top_ks, top_ps)
    return torch.full_like(logits, float("-inf")).scatter_(1, order, ranked)


def mask_ranked(
    ranked: torch.Tensor, logsumexp: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor
) -> torch.Tensor:
    """ranked [B, K] (each row's best logits, best first; logsumexp [B, 1] of its whole row) with the
    ranks past the row's top-k and outside its top-p nucleus set to -inf."""
    ranks = torch.arange(ranked.shape[1], device=ranked.device)[None, :]
    drop = ranks >= top_ks[:, None]
    probs = torch.exp(ranked - logsumexp)  # of the whole row
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the better tokens
    drop |= mass_before >= top_ps[:, None]  # keeps at least the best token
    return ranked.masked_fill(drop, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_ps: torch.Tensor) -> torch.Tensor:
    """Mask logits [B, V] (after temperature) whose probability is below min_ps [B] times the row's
    top probability with -inf: transformers' MinPLogitsWarper, in its place after top-k/top-p. The
    top token always stays, and a token's ratio to it is the same before and after their masks, so
    this keeps exactly their survivors that pass min_p on the unmasked distribution."""
    probs = logits.softmax(dim=-1)  # [B, V]
    threshold = min_ps[:, None] * probs.amax(dim=-1, keepdim=True)  # [B, 1]
    return logits.masked_fill(probs < threshold, float("-inf"))


def exponential_noise(
    probs: torch.Tensor,
    generators: list[torch.Generator | None],
    shared_generator: torch.Generator | None,
    lengths: list[int] | None = None,
) -> torch.Tensor:
    """Exp(1) noise shaped like probs [R, N]. A seeded row draws its first `lengths[i]` columns (all
    N without lengths) from its own generator, so what it draws never depends on the other rows;
    the columns past them (probability 0 there) hold 1."""
    noise = torch.ones_like(probs)
    shared = [i for i, g in enumerate(generators) if g is None]
    if shared:
        noise[shared] = torch.empty(len(shared), probs.shape[1], device=probs.device).exponential_(
            generator=shared_generator
        )
    for i, generator in enumerate(generators):
        if generator is not None:
            noise[i, : lengths[i] if lengths else None].exponential_(generator=generator)
    return noise


def effective_top_k(top_k: int, vocab_size: int) -> int:
    """top_k as the sampler takes it: off (-1) and anything beyond the vocabulary mean all of it."""
    return min(top_k, vocab_size) if top_k > 0 else vocab_size
