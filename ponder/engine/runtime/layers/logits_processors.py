"""Logits processors: what a request's penalties, bias and min_tokens do to its rows' logits before
the sampler (temperature, top-k/top-p, min_p: sampler.py). In vLLM's order:

1. `logit_bias` is added, and while a row has fewer than `min_tokens` output tokens its stop tokens
   (EOS and `stop_token_ids`) are set to -inf;
2. `repetition_penalty` (transformers' RepetitionPenaltyLogitsProcessor) on every token present in
   the prompt or the output: a negative logit is multiplied by it, any other divided by it;
3. `frequency_penalty` and `presence_penalty` (OpenAI's) over the output tokens only:
   logit -= frequency * count + presence * (count > 0).

A row's output is its sequence's output tokens (forced and resumed ones included) and, for a row
verifying a speculative draft, the step's drafts before it: its context holds them. The rows of a
forking sequence (n > 1) share its history; from then on each sample is a sequence with its own.

Batched over the step's rows, with no tensor work per row: one [S, V] count tensor by scatter_add
over the padded output ids, one [S, V] presence mask of the prompts, one [S, V] bias. A step in
which no row uses any of them costs one pass over the rows' parameters (vLLM's no-penalties path).
The processed logits are a new tensor: the model's (ModelRunner.last_logits, which log
probabilities read) stay as they were.

Dimension legend: S sampled rows, V vocab, L the longest history a row brings.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ponder.engine.config import SamplingParams
from ponder.engine.sequence import Sequence


def uses_processors(params: SamplingParams) -> bool:
    """Whether any of this module's processors can change the request's logits."""
    return bool(
        params.frequency_penalty
        or params.presence_penalty
        or params.repetition_penalty != 1
        or params.logit_bias
        or params.min_tokens
    )


def apply_logits_processors(
    logits: torch.Tensor,  # [S, V] float32
    seqs: list[Sequence],  # [S] each row's sequence
    sampled_items: list[int],  # [S] each row's scheduled item (StepPlan.sampled_items)
    row_drafts: list[int],  # [S] the draft each row verifies, -1: none (StepPlan.row_drafts)
    eos_token_ids: Iterable[int],
) -> torch.Tensor:
    """The rows' logits as the sampler takes them: `logits` itself when no row uses a processor,
    else a new tensor."""
    params = [seq.params for seq in seqs]
    if not any(uses_processors(p) for p in params):
        return logits
    drafts = drafts_before(sampled_items, row_drafts)
    num_outputs = [seq.num_output_tokens + len(d) for seq, d in zip(seqs, drafts, strict=True)]
    logits = mask_early_stops(add_logit_bias(logits, params), params, num_outputs, eos_token_ids)
    vocab, device = logits.shape[1], logits.device
    repeating = [p.repetition_penalty != 1 for p in params]
    if any(repeating):
        seen = seen_mask(histories(seqs, drafts, repeating, with_prompt=True), vocab, device)
        logits = apply_repetition_penalty(logits, seen, params)
    penalized = [bool(p.frequency_penalty or p.presence_penalty) for p in params]
    if any(penalized):
        counts = token_counts(histories(seqs, drafts, penalized, with_prompt=False), vocab, device)
        logits = apply_openai_penalties(logits, counts, params)
    return logits


def histories(seqs: list[Sequence], drafts: list[list[int]], wanted: list[bool], with_prompt: bool) -> list[list[int]]:
    """[S] each wanted row's tokens (output, or the prompt's distinct tokens and output), then the
    drafts before it; an empty list for the other rows (their penalty leaves them as they are)."""
    return [
        (seq.distinct_prompt_tokens if with_prompt else []) + seq.output_token_ids + before if want else []
        for seq, before, want in zip(seqs, drafts, wanted, strict=True)
    ]


def drafts_before(sampled_items: list[int], row_drafts: list[int]) -> list[list[int]]:
    """[S] the drafts each row's context holds: those its sequence's earlier rows verify (an item's
    rows come in order: its drafts', then the bonus row; a fork's rows verify none)."""
    seen: dict[int, list[int]] = {}
    before = []
    for item, draft in zip(sampled_items, row_drafts, strict=True):
        drafts = seen.setdefault(item, [])
        before.append(list(drafts))
        if draft >= 0:
            drafts.append(draft)
    return before


def add_logit_bias(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """logits [S, V] + each row's logit_bias (ids the engine checked against the vocabulary when
    the request was added): one [S, V] bias built by one index_put."""
    rows: list[int] = []
    cols: list[int] = []
    values: list[float] = []
    for row, p in enumerate(params):
        rows += [row] * len(p.logit_bias)
        cols += p.logit_bias.keys()
        values += map(float, p.logit_bias.values())
    if not rows:
        return logits
    bias = torch.zeros_like(logits).index_put_(_index(rows, cols, logits.device), _values(values, logits))  # [S, V]
    return logits + bias


def mask_early_stops(
    logits: torch.Tensor,  # [S, V]
    params: list[SamplingParams],  # [S]
    num_outputs: list[int],  # [S] output tokens before each row's
    eos_token_ids: Iterable[int],
) -> torch.Tensor:
    """-inf at EOS and stop_token_ids in the rows short of their min_tokens (as vLLM, EOS even with
    ignore_eos; ids outside the vocabulary are never sampled: skipped)."""
    vocab = logits.shape[1]
    eos = list(eos_token_ids)
    rows: list[int] = []
    cols: list[int] = []
    for row, (p, n) in enumerate(zip(params, num_outputs, strict=True)):
        if n < p.min_tokens:
            stops = {t for t in (*eos, *p.stop_token_ids) if 0 <= t < vocab}
            rows += [row] * len(stops)
            cols += stops
    if not rows:
        return logits
    return logits.index_put(_index(rows, cols, logits.device), _values([float("-inf")], logits))


def apply_repetition_penalty(
    logits: torch.Tensor,  # [S, V]
    seen: torch.Tensor,  # [S, V] bool: in the row's prompt or output
    params: list[SamplingParams],  # [S]
) -> torch.Tensor:
    """transformers' rule: a seen token's logit < 0 is multiplied by the penalty, else divided by it
    (a row with penalty 1 keeps its logits exactly: x * 1 = x / 1 = x)."""
    penalty = logits.new_tensor([p.repetition_penalty for p in params])[:, None]  # [S, 1]
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)  # [S, V]
    return torch.where(seen, penalized, logits)


def apply_openai_penalties(
    logits: torch.Tensor,  # [S, V]
    counts: torch.Tensor,  # [S, V] each token's count in the row's output
    params: list[SamplingParams],  # [S]
) -> torch.Tensor:
    """OpenAI's: logit -= frequency_penalty * count + presence_penalty * (count > 0)."""
    frequency = logits.new_tensor([p.frequency_penalty for p in params])[:, None]  # [S, 1]
    presence = logits.new_tensor([p.presence_penalty for p in params])[:, None]  # [S, 1]
    return logits - (frequency * counts + presence * (counts > 0))


def token_counts(histories: list[list[int]], vocab: int, device: torch.device | None = None) -> torch.Tensor:
    """[S, V] float: how often each token occurs in each row's history, by one scatter_add over the
    padded [S, L] ids (the padding, id V, lands in a spare column that is cut off)."""
    ids = padded(histories, vocab, device)  # [S, L]
    counts = torch.zeros(len(histories), vocab + 1, device=ids.device)  # [S, V + 1]
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=counts.dtype))
    return counts[:, :vocab]


def seen_mask(histories: list[list[int]], vocab: int, device: torch.device | None = None) -> torch.Tensor:
    """[S, V] bool: the tokens present in each row's history."""
    ids = padded(histories, vocab, device)  # [S, L]
    seen = torch.zeros(len(histories), vocab + 1, dtype=torch.bool, device=ids.device)  # [S, V + 1]
    seen.scatter_(1, ids, True)
    return seen[:, :vocab]


def padded(histories: list[list[int]], pad: int, device: torch.device | None) -> torch.Tensor:
    """[S, L] int64: each row's ids, then `pad` up to the longest row's length."""
    width = max(map(len, histories), default=0)
    return torch.tensor([h + [pad] * (width - len(h)) for h in histories], dtype=torch.long, device=device)


def _index(rows: list[int], cols: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(rows, device=device), torch.tensor(cols, device=device)


def _values(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device)
