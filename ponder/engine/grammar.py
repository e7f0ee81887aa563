"""Constrained decoding: each constrained sequence's answer held to its constraint
(ponder/engine/constraint.py) by an llguidance matcher whose mask of allowed next tokens the
sampler applies.

What is constrained is the answer. For a reasoning model (its prompt opens `<think>`) that is the
output after the first `</think>`, generated or forced by the thinking budget, with any whitespace
first (R1 writes `</think>\\n\\n`): the reasoning is free text and never holds the constrained
answer. For any other model, every output token.

Invariant: a sequence's matcher has consumed exactly its answer tokens so far. The tokens are the
truth: a forked sample, a preempted sequence or one resumed from a checkpoint gets its matcher
rebuilt from them (`Grammars.matchers`), so no matcher state travels or is saved.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property

import llguidance

from ponder.engine.constraint import llguidance_grammar
from ponder.engine.errors import RequestFailed
from ponder.engine.reasoning import THINK_END, prompt_opens_thinking
from ponder.engine.sequence import Sequence
from ponder.engine.tokenizer import Tokenizer

MAX_COMPILED = 64  # grammars whose compiled matcher a worker keeps (new sequences copy it)


@dataclass
class _Answer:
    """One constrained sequence's matcher and where its answer starts in its output."""

    reasoning: bool  # the prompt opens `<think>`: the answer starts after `</think>`
    start: int | None = None  # output index of the answer's first token; None: still reasoning
    searched: int = 0  # output tokens already searched for `</think>` (each is looked at once)
    matcher: llguidance.LLMatcher | None = None
    consumed: int = 0  # answer tokens the matcher has consumed


class Grammars:
    """The engine's constrained sequences' matchers (kept where the sampling happens: rank 0)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: list[int]) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size  # the logits' width (the model's; the tokenizer's may be less)
        self._eos_token_ids = eos_token_ids
        self._think_end_ids = tokenizer.encode(THINK_END, add_special_tokens=False)
        self._answers: weakref.WeakKeyDictionary[Sequence, _Answer] = weakref.WeakKeyDictionary()
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()  # grammar -> unused matcher

    @cached_property
    def tokenizer(self) -> llguidance.LLTokenizer:
        """Built at the first constrained request: ~0.3 s for SmolLM2's vocabulary, ~1 s for R1's."""
        return llguidance.LLTokenizer(
            self._tokenizer.backend.to_str(), n_vocab=self._vocab_size, eos_token=self._eos_token_ids
        )

    def matchers(
        self, seqs: list[Sequence], row_drafts: list[int] | None = None
    ) -> list[tuple[llguidance.LLMatcher, int]]:
        """(matcher, row) for each row of `seqs` whose token is constrained, each matcher in step
        with its sequence's tokens. Speculative decoding: a sequence's rows verify its drafts in
        order (`row_drafts`: the draft each row verifies, -1 none), so a row after drafts gets a
        copy of the matcher advanced by them (the sequence's own stays at its tokens; the drafts
        that stand reach it next step, as tokens). A sequence whose tokens its grammar refuses
        (tokens that did not come from its masks) raises RequestFailed: the engine fails that
        request alone."""
        rows: list[tuple[llguidance.LLMatcher, int]] = []
        item: Sequence | None = None
        matcher: llguidance.LLMatcher | None = None
        for row, seq in enumerate(seqs):
            if seq.params.constraint is None:
                continue
            if seq is not item:  # an item's first row (a fork's sample rows share it)
                item, drafts, matcher = seq, [], self._in_step(seq)
            elif row_drafts and (draft := row_drafts[row - 1]) != -1:
                drafts.append(draft)
                matcher = self._after_draft(seq, matcher, drafts)
            if matcher is not None:
                rows.append((matcher, row))
        return rows

    def _after_draft(
        self, seq: Sequence, before: llguidance.LLMatcher | None, drafts: list[int]
    ) -> llguidance.LLMatcher | None:
        """The matcher of the row after `drafts` (the last one new): `before` advanced by it, or a
        new one where it completes `</think>`. A draft the grammar refuses leaves the copy as it
        was: that row's token cannot stand (its draft is refused at the row before), so its mask
        is never used."""
        if before is not None:
            after = before.deep_copy()
            after.try_consume_tokens(drafts[-1:])
            return after
        tag = self._think_end_ids
        if (seq.output_token_ids + drafts)[-len(tag) :] != tag:
            return None  # still reasoning after this draft
        return self._new_matcher(llguidance_grammar(seq.params.constraint, after_reasoning=True))

    def _new_matcher(self, grammar: str) -> llguidance.LLMatcher:
        """A fresh matcher of `grammar`: a copy of the one compiled at the grammar's first use
        (compiling takes ~1-2 ms, a copy ~2 us), the last MAX_COMPILED grammars kept."""
        compiled = self._compiled.get(grammar)
        if compiled is None:
            compiled = self._compiled[grammar] = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
            if len(self._compiled) > MAX_COMPILED:
                self._compiled.popitem(last=False)
        self._compiled.move_to_end(grammar)
        return compiled.deep_copy()

    def _in_step(self, seq: Sequence) -> llguidance.LLMatcher | None:
        answer = self._answers.get(seq)
        if answer is None:
            answer = self._answers[seq] = _Answer(prompt_opens_thinking(self._tokenizer, seq.prompt_token_ids))
        output = seq.output_token_ids
        if answer.start is None:
            answer.start = self._answer_start(answer, output)
            if answer.start is None:
                return None
            answer.matcher = self._new_matcher(
                llguidance_grammar(seq.params.constraint, after_reasoning=answer.reasoning)
            )
        assert answer.matcher is not None
        new = output[answer.start + answer.consumed :]
        if new and not answer.matcher.consume_tokens(new):
            error = answer.matcher.get_error()
            raise RequestFailed(f"request {seq.request_id}: its answer left its constraint ({error})")
        answer.consumed += len(new)
        return answer.matcher

    def _answer_start(self, answer: _Answer, output: list[int]) -> int | None:
        """Where the answer starts: at once, or just after the first `</think>` (searched from
        where the last search stopped, so a long reasoning costs one pass, not one per step)."""
        if not answer.reasoning:
            return 0
        tag = self._think_end_ids
        first = max(0, answer.searched - len(tag) + 1)
        answer.searched = len(output)
        for i in range(first, len(output) - len(tag) + 1):
            if output[i : i + len(tag)] == tag:
                return i + len(tag)
        return None
