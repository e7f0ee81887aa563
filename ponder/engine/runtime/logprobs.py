"""Log probabilities of sampled and known tokens (docs/architecture.md#log-probabilities).

Values come from the model's own distribution, log_softmax of its logits, before temperature,
penalties, biases or constraint masks (vLLM's default, "raw" log probabilities): they say what the
model thought, whatever the sampler then did. Each row is reduced at once to its token's value, its
rank (1 + the tokens strictly more likely) and its k best alternatives. Known tokens (a prompt's,
a forced tag's) are scored from the hidden rows a chunk of rows at a time, so a 32K-token prompt
never holds a [T, V] tensor: at most SCORE_CHUNK_FLOATS floats of logits at once.

Dimension legend: R rows, V vocab, K alternatives, E hidden size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ponder.engine.outputs import TokenLogprob

SCORE_CHUNK_FLOATS = 1 << 24  # logits scored at once: 64 MiB of fp32 (~130 rows of R1's vocabulary)


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, ks: list[int]) -> list[TokenLogprob]:
    """logits [R, V], token_ids [R] -> each row's token's value, rank and its ks[r] best alternatives."""
    logprobs = logits.float().log_softmax(dim=-1)  # [R, V]
    chosen = logprobs.gather(1, token_ids[:, None])  # [R, 1]
    ranks = (logprobs > chosen).sum(dim=-1) + 1  # [R]
    k = max(ks, default=0)
    top_values, top_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], logprobs[:, :0].long())  # [R, K]
    columns = (token_ids.tolist(), chosen[:, 0].tolist(), ranks.tolist(), top_ids.tolist(), top_values.tolist(), ks)
    rows = zip(*columns, strict=True)
    return [
        TokenLogprob(token, value, rank, tuple(zip(ids[:n], values[:n], strict=True)))
        for token, value, rank, ids, values, n in rows
    ]


def sampled_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, alternatives: list[int | None]
) -> list[TokenLogprob | None]:
    """logits [S, V] (the model's), tokens [S] sampled from them, each row's request's `logprobs`
    -> each row's token's value where its request wants them (k alternatives), else None."""
    wanted = [row for row, k in enumerate(alternatives) if k is not None]
    values: list[TokenLogprob | None] = [None] * len(alternatives)
    if wanted:
        index = torch.tensor(wanted, device=logits.device)
        ks = [alternatives[row] or 0 for row in wanted]
        for row, value in zip(wanted, token_logprobs(logits[index], tokens[index], ks), strict=True):
            values[row] = value
    return values


def score_rows(
    hidden: torch.Tensor,  # [T, E]
    rows: list[int],  # [R] hidden rows whose next token is known
    token_ids: list[int],  # [R] that token
    ks: list[int],  # [R] alternatives wanted
    compute_logits: Callable[[torch.Tensor], torch.Tensor | None],  # [R, E] -> [R, V] on rank 0, else None
    vocab_size: int,
) -> list[TokenLogprob]:
    """Each row's TokenLogprob (on rank 0; [] on the others, which take part in every chunk's
    LM-head collective all the same)."""
    chunk = max(1, SCORE_CHUNK_FLOATS // vocab_size)
    values: list[TokenLogprob] = []
    for begin in range(0, len(rows), chunk):
        index = torch.tensor(rows[begin : begin + chunk], device=hidden.device)
        logits = compute_logits(hidden[index])  # [R, V]
        if logits is not None:
            targets = torch.tensor(token_ids[begin : begin + chunk], device=hidden.device)
            values += token_logprobs(logits, targets, ks[begin : begin + chunk])
    return values
