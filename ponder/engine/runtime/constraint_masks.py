"""A step's constraint masks (ponder/engine/grammar.py), computed while its forward pass runs: the
rows' matchers are brought in step with their tokens (known before the forward) on a thread of
their own, and llguidance fills the bitmasks on its threads, outside the GIL, while torch runs
the model. Rank 0's (it samples under tensor parallelism).

Dimension legend: S sampled rows, V vocab, W = ceil(V / 32) mask words.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from functools import cached_property

import llguidance
import torch

from ponder.engine.grammar import Grammars
from ponder.engine.sequence import Sequence


class ConstraintMasks:
    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size  # the logits' width
        self.grammars: Grammars | None = None  # the engine's constrained sequences (set by LLMEngine)

    @cached_property
    def _threads(self) -> tuple[ThreadPoolExecutor, llguidance.LLExecutor]:
        """Made at the first constrained step: a worker rank, or an engine never asked for a
        constraint, starts none."""
        return ThreadPoolExecutor(max_workers=1, thread_name_prefix="constraint-masks"), llguidance.LLExecutor()

    def start(self, seqs: list[Sequence], row_drafts: list[int]) -> Future:
        """The rows' bitmask [S, W] (None: no row constrained now), on its way; `row_drafts`: the
        draft each row verifies (-1: none), as the step's plan has them. Wait for it before
        the next start: a step's masks must not overlap the next's. Its result raises the
        RequestFailed of a sequence whose tokens its grammar refuses."""
        if self.grammars is None or not any(seq.params.constraint for seq in seqs):
            done: Future = Future()
            done.set_result(None)
            return done
        thread, fill_threads = self._threads
        return thread.submit(bitmask, self.grammars, fill_threads, seqs, row_drafts, self.vocab_size)


def disallow(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """A copy of logits [S, V] with each row's refused tokens (bit 0 in masks [S, W]) at -inf; the
    logits themselves stay the model's (ModelRunner.last_logits)."""
    import llguidance.torch  # (at first use: see bitmask)

    held = logits.clone()
    llguidance.torch.apply_token_bitmask_inplace(held, masks.to(logits.device))
    return held


def bitmask(
    grammars: Grammars, threads: llguidance.LLExecutor, seqs: list[Sequence], row_drafts: list[int], vocab_size: int
):
    """[S, W] int32: each constrained row's allowed tokens (after the drafts its row follows), the
    other rows all allowed; None when every constrained row is still reasoning."""
    rows = grammars.matchers(seqs, row_drafts)
    if not rows:
        return None
    # llguidance.torch is imported at the first constrained step, not with the engine: it decorates
    # a kernel with torch.compile, whose import (dynamo, inductor) costs every process ~1 s of CPU,
    # every worker and every tensor-parallel rank, constrained or not.
    import llguidance.torch

    masks: torch.Tensor = llguidance.torch.allocate_token_bitmask(len(seqs), vocab_size)
    first_row: dict[int, int] = {}  # a forking sequence's rows (one per sample) share its matcher: one mask
    for matcher, row in rows:
        first_row.setdefault(id(matcher), row)
    unique = [(matcher, row) for matcher, row in rows if first_row[id(matcher)] == row]
    llguidance.torch.fill_next_token_bitmask_par(threads, unique, masks)
    for matcher, row in rows:
        masks[row] = masks[first_row[id(matcher)]]
    return masks
