"""Continuous batching under a token budget, with chunked prefill and preemption by recompute.

Every step first serves running sequences (a decode token each, or the next prompt chunk), then
admits waiting ones into what is left of `max_num_batched_tokens`. When blocks run out, the newest
running sequence gives its blocks back and goes to the front of the queue (recompute later).
A request with n > 1 samples forks when its first token is sampled (`update`); each sample is then
scheduled, preempted and finished as a sequence of its own. No torch.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from ponder.engine.block_manager import BlockManager
from ponder.engine.config import EngineConfig
from ponder.engine.errors import RequestRejected
from ponder.engine.outputs import TokenLogprob
from ponder.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSequence:
    """One sequence's share of a step: `num_new_tokens` from `start` on, the last
    `len(draft_token_ids)` of them drafts to verify (speculative decoding). A step that completes a
    forking request's prompt samples `num_samples` first tokens from its last logits row, one per
    sample; `update` forks samples 1..n-1 (`forked`) from them."""

    seq: Sequence
    num_new_tokens: int
    draft_token_ids: list[int] = field(default_factory=list)
    start: int = field(init=False)  # the sequence's num_computed_tokens when scheduled
    num_samples: int = field(init=False)  # tokens sampled from the last row: n when forking, else 1
    forked: list[Sequence] = field(default_factory=list)  # set by update: the samples forked this step

    def __post_init__(self) -> None:
        self.start = self.seq.num_computed_tokens
        self.num_samples = self.seq.params.n if self.seq.fork_pending and self.completes else 1

    @property
    def completes(self) -> bool:
        """This step computes the sequence's last known token, so its logits give the next one."""
        return self.start + self.num_new_tokens == len(self.seq) + len(self.draft_token_ids)


@dataclass
class SampledTokens:
    """What a step produced for one scheduled sequence: the tokens sampled (none mid-prefill; the
    drafts that stood and one of the model's own; a fork's first token per sample), each one's log
    probability when its sequence wants them, and the log probabilities of known tokens the step's
    rows scored (`Sequence.unscored`: prompt tokens, a forced tag), by position."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    scored: list[tuple[int, TokenLogprob]] = field(default_factory=list)


class Scheduler:
    def __init__(
        self,
        config: EngineConfig,
        num_blocks: int,
        max_model_len: int,
        eos_token_ids: list[int] | None = None,
        num_speculative_tokens: int = 0,
    ) -> None:
        self.eos_token_ids = frozenset(eos_token_ids or [])
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_model_len = max_model_len
        # Drafting k tokens runs the drafter k times past the verified ones: k - 1 slots ahead.
        self.num_lookahead_slots = max(num_speculative_tokens - 1, 0)
        self.drafting = num_speculative_tokens > 0
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        longest = seq.num_prompt_tokens + seq.params.max_tokens
        if seq.num_prompt_tokens == 0:
            raise RequestRejected(f"request {seq.request_id}: the prompt is empty")
        if seq.num_output_tokens > seq.params.max_tokens:
            raise RequestRejected(
                f"request {seq.request_id}: resumed with {seq.num_output_tokens} output tokens, more than "
                f"max_tokens {seq.params.max_tokens}"
            )
        if seq.params.n > self.max_num_seqs:
            raise RequestRejected(
                f"request {seq.request_id}: n={seq.params.n} samples exceed max_num_seqs {self.max_num_seqs}"
            )
        if seq.params.n > 1 and seq.num_output_tokens:
            raise RequestRejected(
                f"request {seq.request_id}: a resumed request has one sample (resume sample i with n=1, sample_index=i)"
            )
        if longest > self.max_model_len:
            raise RequestRejected(
                f"request {seq.request_id}: prompt ({seq.num_prompt_tokens} tokens) + max_tokens "
                f"({seq.params.max_tokens}) = {longest} exceeds max_model_len {self.max_model_len}"
            )
        bm = self.block_manager
        if bm.blocks_for(longest) > bm.num_blocks:
            raise RequestRejected(
                f"request {seq.request_id}: {longest} tokens need {bm.blocks_for(longest)} KV blocks but the "
                f"whole cache has {bm.num_blocks} ({bm.num_blocks * bm.block_size} tokens)"
            )
        self.waiting.append(seq)
        if seq.num_output_tokens:  # resumed: it may have ended where the earlier run stopped
            self._check_finished(seq, seq.token_ids[-1])

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledSequence]:
        budget = self.max_num_batched_tokens
        scheduled, preempted = self._schedule_running(budget)
        budget -= sum(s.num_new_tokens for s in scheduled)
        if not preempted:
            scheduled += self._admit_waiting(budget)
        return scheduled

    def _schedule_running(self, budget: int) -> tuple[list[ScheduledSequence], bool]:
        scheduled: list[ScheduledSequence] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            drafts = self._drafts_to_verify(seq, budget)
            num_new = min(seq.num_uncomputed_tokens + len(drafts), budget)
            while not self._reserve(seq, num_new):
                preempted = True
                victim = self.running.pop()  # newest first; never one already scheduled (index < i)
                self._preempt(victim)
                if victim is seq:
                    return scheduled, preempted
            scheduled.append(ScheduledSequence(seq, num_new, drafts))
            budget -= num_new
            i += 1
        return scheduled, preempted

    def _reserve(self, seq: Sequence, num_new: int) -> bool:
        """Blocks for what the step writes: its own copy of any shared block it writes into (a
        forked sample's last prompt block), then slots for the new tokens; False if blocks run out."""
        bm = self.block_manager
        return bm.copy_on_write(seq, seq.num_computed_tokens) and bm.ensure_slots(seq, self._slots_needed(seq, num_new))

    def _drafts_to_verify(self, seq: Sequence, budget: int) -> list[int]:
        """The drafts a decoding sequence can verify this step: no more than the budget holds, and
        never so many that accepting all of them would step past max_tokens, max_model_len or the
        thinking budget (so a step ends exactly where one-token steps would have stopped). A
        sequence's first sampled token verifies none (a forking request draws n from that row)."""
        if seq.num_uncomputed_tokens != 1 or not seq.draft_token_ids or not seq.has_sampled:
            return []
        room = min(self._longest(seq) - len(seq), budget) - 1
        thinking = seq.params.max_reasoning_tokens
        if thinking is not None and seq.num_output_tokens < thinking:
            room = min(room, thinking - seq.num_output_tokens - 1)
        return seq.draft_token_ids[: max(room, 0)]

    def _slots_needed(self, seq: Sequence, num_new: int) -> int:
        computed = seq.num_computed_tokens + num_new
        return max(computed, min(computed + self.num_lookahead_slots, self._longest(seq)))

    def _longest(self, seq: Sequence) -> int:
        return min(seq.max_length, self.max_model_len)

    def _admit_waiting(self, budget: int) -> list[ScheduledSequence]:
        scheduled = []
        bm = self.block_manager
        seats = sum(self._seats(seq) for seq in self.running)
        while self.waiting and budget > 0 and seats + self._seats(self.waiting[0]) <= self.max_num_seqs:
            seq = self.waiting[0]
            cached = bm.allocate_cached_prefix(seq)
            if seq.num_cached_tokens is None:
                seq.num_cached_tokens = cached  # usage reports the first admission's hit
            num_new = min(seq.num_uncomputed_tokens, budget)
            if not bm.ensure_slots(seq, self._slots_needed(seq, num_new)):
                bm.free(seq)  # give the prefix hits back; try again next step
                seq.num_computed_tokens = 0
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            seq.first_scheduled_time = seq.first_scheduled_time or time.time()
            self.running.append(seq)
            seats += self._seats(seq)
            scheduled.append(ScheduledSequence(seq, num_new))
            budget -= num_new
        return scheduled

    @staticmethod
    def _seats(seq: Sequence) -> int:
        """Of max_num_seqs, what it takes: a request yet to fork becomes n running samples."""
        return seq.params.n if seq.fork_pending else 1

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def update(self, scheduled: list[ScheduledSequence], sampled: list[SampledTokens]) -> None:
        """Record what the step computed and append its tokens per sequence: none mid-prefill, one,
        or, verifying drafts, the drafts that stood plus the model's own next token. Tokens after
        one that finishes the sequence are dropped, so it ends where one-token steps would end. A
        forking item's tokens are one first token per sample: the others are forked here."""
        for item, result in zip(scheduled, sampled, strict=True):
            seq = item.seq
            if seq.is_finished:  # failed during the step (LLMEngine._execute): its blocks are gone
                continue
            for position, value in result.scored:
                seq.record_logprob(position, value)
            token_ids, logprobs = result.token_ids, result.logprobs
            first_tokens: list[int] = []
            if item.num_samples > 1:
                token_ids, first_tokens = token_ids[:1], token_ids[1:]
            num_drafts = len(item.draft_token_ids)
            seq.num_draft_tokens += num_drafts
            seq.num_accepted_tokens += len(token_ids) - 1 if num_drafts else 0
            token_ids = self._until_finished(seq, token_ids)
            rejected = num_drafts - (len(token_ids) - 1) if num_drafts else 0
            seq.num_computed_tokens += item.num_new_tokens - rejected  # a rejected draft's KV is overwritten later
            seq.draft_token_ids = []
            self.block_manager.commit_full_blocks(seq)
            if item.num_samples > 1 and token_ids:
                item.forked = self._fork(seq, first_tokens, logprobs[1:])
            if token_ids:
                seq.append_tokens(token_ids, logprobs[: len(token_ids)] if logprobs else None)
                self._check_finished(seq, token_ids[-1])

    def _fork(self, parent: Sequence, first_tokens: list[int], logprobs: list[TokenLogprob]) -> list[Sequence]:
        """Samples 1..n-1, each with its first token, running and sharing the parent's blocks. With
        drafting on, each gets its own copy of the last prompt block at once: the drafter's entry at
        the last prompt position depends on the sample's first token (ModelRunner.propose writes it).
        A sample without room for that copy is preempted (recomputed later, alone)."""
        parent.fork_pending = False
        children = []
        for index, token_id in enumerate(first_tokens, start=1):
            child = parent.fork(index)
            self.block_manager.fork(parent, child)
            self.running.append(child)
            child.append_tokens([token_id], logprobs[index - 1 : index] if logprobs else None)
            self._check_finished(child, token_id)
            last_prompt_position = child.num_computed_tokens - 1
            if self.drafting and not child.is_finished:
                if not self.block_manager.copy_on_write(child, last_prompt_position):
                    self.running.remove(child)
                    self._preempt(child)
            children.append(child)
        return children

    def _until_finished(self, seq: Sequence, token_ids: list[int]) -> list[int]:
        for n, token_id in enumerate(token_ids, start=1):
            if self._is_stop(seq, token_id) or len(seq) + n >= self._longest(seq):
                return token_ids[:n]
        return token_ids

    def force_tokens(self, seq: Sequence, token_ids: list[int]) -> None:
        """Append tokens the model did not choose (the thinking budget's end tag); the next steps
        compute them like a prompt chunk."""
        room = min(seq.params.max_tokens - seq.num_output_tokens, self.max_model_len - len(seq))
        seq.draft_token_ids = []  # drafted after other tokens than these
        seq.token_ids.extend(token_ids[: max(room, 0)])  # not a first token: the model wrote none of them
        if seq.num_output_tokens >= seq.params.max_tokens or len(seq) >= self.max_model_len:
            self.finish(seq, "length")

    def _check_finished(self, seq: Sequence, token_id: int) -> None:
        if self._is_stop(seq, token_id):
            self.finish(seq, "stop")
        elif len(seq) >= self._longest(seq):
            self.finish(seq, "length")

    def _is_stop(self, seq: Sequence, token_id: int) -> bool:
        params = seq.params
        return token_id in params.stop_token_ids or (not params.ignore_eos and token_id in self.eos_token_ids)

    def finish(self, seq: Sequence, reason: str) -> None:
        if seq.is_finished:
            return
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.finished_time = time.time()
