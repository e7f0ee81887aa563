"""Speculative decoding's drafter: the model's MTP layer proposes the next tokens of every sequence
that decodes next step (docs/architecture.md#speculative-decoding). The plans are plain lists
(ponder/engine/step_plan.py); the runner runs them on every rank."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ponder.engine.scheduler import ScheduledSequence
from ponder.engine.sequence import Sequence, SequenceStatus
from ponder.engine.step_plan import StepPlan, one_token_rows


class MtpDrafter:
    """Drafts k tokens per sequence after each step, through `forward` (the runner's: a plan run on
    every rank, the logits [S, V] on rank 0)."""

    def __init__(
        self, forward: Callable[[StepPlan], torch.Tensor | None], num_speculative_tokens: int, block_size: int
    ) -> None:
        self.forward = forward
        self.num_speculative_tokens = num_speculative_tokens
        self.block_size = block_size

    @torch.inference_mode()
    def propose(self, scheduled: list[ScheduledSequence], step: StepPlan | None) -> None:
        """Speculative decoding's drafts for the step just run (`step`, its main pass; after the
        scheduler's update): the MTP layer runs over every position the step computed and kept,
        each with the token after it, which fills its own cache there; the last row of each
        sequence that decodes next gives draft 1. Drafts 2..k run it one token further each, from
        its own last hidden state."""
        if not self.num_speculative_tokens or not scheduled or step is None:
            return  # (no plan: the step was split to find a faulty request; no drafts this once)
        plan, drafting, positions = draft_plan(scheduled, step.item_rows, self.block_size)
        for seq in drafting:
            seq.draft_token_ids = []
        for k in range(self.num_speculative_tokens):
            if not plan.input_ids:  # every sequence of the step finished, or none has a slot to draft in
                return
            logits = self.forward(plan)
            if logits is None:
                return
            for seq, token in zip(drafting, logits.argmax(dim=-1).tolist(), strict=True):
                seq.draft_token_ids.append(token)
            if k + 1 == self.num_speculative_tokens:
                return
            plan, drafting, positions = next_draft_plan(plan, drafting, positions, self.block_size)


def draft_plan(
    scheduled: list[ScheduledSequence], item_rows: list[int], block_size: int
) -> tuple[StepPlan, list, list[int]]:
    """The first MTP pass, and the sequences it drafts for with the position each drafts at."""
    order = sorted(range(len(scheduled)), key=lambda i: not one_token_rows(scheduled[i]))  # decodes first
    rows: list[int] = []
    plan = StepPlan(draft_rows=rows)
    drafting, positions = [], []
    for i in order:
        item = scheduled[i]
        for seq, first, end in kept_spans(item, block_size):
            # The token after each position, and the model's hidden state at it.
            plan.add(seq.token_ids[first + 1 : end + 1], first, seq.block_table, one_token_rows(item))
            rows += range(item_rows[i] + first - item.start, item_rows[i] + end - item.start)
            if seq.num_uncomputed_tokens == 1:  # decodes next step: draft for it
                plan.logits_indices.append(len(plan.input_ids) - 1)
                drafting.append(seq)
                positions.append(end)
    return plan, drafting, positions


def kept_spans(item: ScheduledSequence, block_size: int) -> list[tuple[Sequence, int, int]]:
    """(sequence, first, end): the positions [first, end) of the step's hidden rows whose drafter
    entries each running sequence gets: the item's own sequence those the step computed and kept;
    each sample forked this step those from its own (copied) block of the last prompt position
    on, whose last entry depends on the sample's first token (the blocks before are shared)."""
    spans = []
    if item.seq.status is SequenceStatus.RUNNING and item.seq.num_computed_tokens > item.start:
        spans.append((item.seq, item.start, item.seq.num_computed_tokens))
    end = item.start + item.num_new_tokens  # a forking step verifies no drafts: it kept every token
    first = max(item.start, (end - 1) // block_size * block_size)
    spans += [(seq, first, end) for seq in item.forked if seq.status is SequenceStatus.RUNNING]
    return spans


def next_draft_plan(
    previous: StepPlan, drafting: list, positions: list[int], block_size: int
) -> tuple[StepPlan, list, list[int]]:
    """One more draft token per sequence, at the next position, from the last draft and the MTP
    layer's own hidden state; a sequence without a cache slot there stops drafting."""
    rows: list[int] = []
    plan = StepPlan(draft_rows=rows)
    still, next_positions = [], []
    for seq, position, row in zip(drafting, positions, previous.logits_indices, strict=True):
        if position >= len(seq.block_table) * block_size:
            continue
        plan.add([seq.draft_token_ids[-1]], position, seq.block_table, one_token_rows=True)
        rows.append(row)
        plan.logits_indices.append(len(plan.input_ids) - 1)
        still.append(seq)
        next_positions.append(position + 1)
    return plan, still, next_positions
