"""One forward pass as plain lists (`StepPlan`): what a step computes, built from the scheduler's
output with no torch, and what rank 0 sends the other ranks (small, picklable). The runner turns
a plan into tensors (ponder/engine/runtime/model_runner.py).

Dimension legend: T tokens in the step, B sequences, M blocks per sequence, S sampled rows,
C block copies."""

from __future__ import annotations

from dataclasses import dataclass, field

from ponder.engine.scheduler import ScheduledSequence


@dataclass
class StepPlan:
    """One forward pass as plain lists: what rank 0 sends the other ranks (small, picklable). The
    model's pass, or with `draft_rows` the MTP layer's pass over those rows of the previous pass's
    hidden states (speculative decoding). `block_copies` are done first (copy on write of forked
    samples' shared blocks); a plan with copies only runs no forward."""

    input_ids: list[int] = field(default_factory=list)  # [T]
    positions: list[int] = field(default_factory=list)  # [T]
    query_lens: list[int] = field(default_factory=list)  # [B] new tokens per sequence, decodes first
    context_lens: list[int] = field(default_factory=list)  # [B]
    block_tables: list[list[int]] = field(default_factory=list)  # [B][M]
    num_decodes: int = 0
    logits_indices: list[int] = field(default_factory=list)  # [S]
    # Rank 0's bookkeeping (the other ranks ignore it): the scheduled item of each logits row, the
    # draft each row verifies (-1: none), the sample each row draws for (a forking item's rows draw
    # samples 0..n-1 from one hidden row; else 0), each scheduled item's first row in [T].
    sampled_items: list[int] = field(default_factory=list)  # [S]
    row_drafts: list[int] = field(default_factory=list)  # [S]
    row_samples: list[int] = field(default_factory=list)  # [S]
    item_rows: list[int] = field(default_factory=list)
    # Rows whose next token is known and wanted with its log probability (Sequence.unscored: prompt
    # tokens, a forced tag), scored by every rank's LM head in chunks; the token each row is scored
    # for, and (rank 0's bookkeeping) the alternatives wanted, the scheduled item and the position.
    score_rows: list[int] = field(default_factory=list)  # [R]
    score_token_ids: list[int] = field(default_factory=list)  # [R]
    score_ks: list[int] = field(default_factory=list)  # [R]
    score_items: list[int] = field(default_factory=list)  # [R]
    score_positions: list[int] = field(default_factory=list)  # [R]
    draft_rows: list[int] | None = None  # [T] MTP pass: the previous pass's hidden row of each token
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # [C] (source, destination) blocks

    def add(self, token_ids: list[int], start: int, block_table: list[int], one_token_rows: bool) -> int:
        """Append one sequence's tokens at positions start.. and return the first one's row: as one
        span (a prompt chunk over the cached prefix), or as one-token rows each attending up to its
        own position, so that the batched decode attention serves a decode and a sequence verifying
        drafts alike (vLLM's batch expansion). All rows come before the first span (decodes first)."""
        first, n = len(self.input_ids), len(token_ids)
        self.input_ids += token_ids
        self.positions += range(start, start + n)
        lengths = [(1, start + j + 1) for j in range(n)] if one_token_rows else [(n, start + n)]
        for query_len, context_len in lengths:
            self.query_lens.append(query_len)
            self.context_lens.append(context_len)
            self.block_tables.append(block_table)
        self.num_decodes += n if one_token_rows else 0
        return first


def plan_step(scheduled: list[ScheduledSequence]) -> StepPlan:
    """The step's main pass: each scheduled sequence's new tokens (and the drafts it verifies), the
    rows whose next token is sampled, and which sequence and sample each of those rows is."""
    # Decodes and draft verifications first, as one-token rows: one batched decode attention call.
    order = sorted(range(len(scheduled)), key=lambda i: not one_token_rows(scheduled[i]))
    plan = StepPlan(item_rows=[0] * len(scheduled))
    for i in order:
        item = scheduled[i]
        seq, num_new, drafts, start = item.seq, item.num_new_tokens, item.draft_token_ids, item.start
        tokens = seq.token_ids[start : start + num_new] + drafts  # drafts: after the one uncomputed token
        plan.item_rows[i] = plan.add(tokens, start, seq.block_table, one_token_rows(item))
        _score_known_tokens(plan, i, item)
        if item.completes:
            # The last token's row, and before it one row per draft it verifies; a fork samples
            # that row once more for each sample after the first.
            last = len(plan.input_ids) - 1
            forks = item.num_samples - 1
            plan.logits_indices += [*range(last - len(drafts), last + 1), *[last] * forks]
            plan.sampled_items += [i] * (len(drafts) + 1 + forks)
            plan.row_drafts += [*drafts, -1, *[-1] * forks]
            plan.row_samples += [*[0] * (len(drafts) + 1), *range(1, forks + 1)]
    return plan


def _score_known_tokens(plan: StepPlan, i: int, item: ScheduledSequence) -> None:
    """The item's rows (its drafts' aside) that precede a known token still wanting its log
    probability: the row at position p scores the token at p + 1. Each of `Sequence.unscored`'s
    ranges lies in the prompt or in the output, so it wants one k: its positions go in as slices."""
    seq, start = item.seq, item.start
    computed_end = start + item.num_new_tokens - len(item.draft_token_ids)
    for wanted in seq.unscored:
        first, end = max(wanted.start, start + 1), min(wanted.stop, computed_end + 1)
        if first >= end:
            continue
        k = seq.params.prompt_logprobs if first < seq.num_prompt_tokens else seq.params.logprobs
        row = plan.item_rows[i] - 1 - start
        plan.score_rows += range(row + first, row + end)
        plan.score_token_ids += seq.token_ids[first:end]
        plan.score_ks += [k or 0] * (end - first)
        plan.score_items += [i] * (end - first)
        plan.score_positions += range(first, end)


def one_token_rows(item: ScheduledSequence) -> bool:
    """One token to compute besides any drafts it verifies: a decode (or a one-token chunk)."""
    return item.num_new_tokens - len(item.draft_token_ids) == 1
