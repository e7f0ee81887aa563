"""One request's state as the scheduler and block manager see it. No torch."""

from __future__ import annotations

import time
from enum import Enum, auto
from functools import cached_property

from ponder.engine.config import SamplingParams
from ponder.engine.outputs import TokenLogprob


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    """One sample of a request: token ids (prompt then output), the block table, and how many
    tokens the KV cache holds.

    `num_computed_tokens` counts tokens whose K/V are in the cache; the tokens after it are what
    the next step must run (a chunk of the prompt, one decode token, or forced tokens).

    A request with `params.n > 1` is one sequence (sample 0, `fork_pending`) until its prompt is
    computed; the step that samples its first token forks samples 1..n-1 from it (`fork`), each
    sharing its blocks (docs/architecture.md#parallel-sampling). From then on every sample is a
    sequence of its own: scheduled, preempted and finished alone.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        index: int = 0,
        cache_salt: str | None = None,
    ) -> None:
        self.request_id = request_id
        self.index = index  # which sample of the request (CompletionOutput.index)
        # Mixed into the first block's prefix-cache hash: only sequences with the same salt share
        # cached blocks (a tenant's, so `cached_tokens` reveals nothing of another's prompts).
        self.cache_salt = cache_salt
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        # Sample 0 of an n-request, until the step that samples its first token forks the others.
        self.fork_pending = index == 0 and params.n > 1
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.num_computed_tokens = 0
        # Prompt tokens served from the prefix cache at first admission (reported as usage).
        self.num_cached_tokens: int | None = None
        self.num_preemptions = 0
        # Speculative decoding: the drafter's guesses at the next tokens (not part of token_ids until
        # the model verifies them), and how many drafts were scored and accepted over the request.
        self.draft_token_ids: list[int] = []
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        # Log probabilities recorded so far (params.logprobs / prompt_logprobs): one per output token
        # from the first on, one per prompt token from the first on (None for it: nothing precedes
        # it). Kept through preemption: a recomputed position is not scored again.
        self.output_logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: list[TokenLogprob | None] | None = [None] if params.prompt_logprobs is not None else None
        self.finish_reason: str | None = None
        self.arrival_time = time.time()
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.finished_time: float | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def seq_id(self) -> tuple[str, int]:
        """Unique per sequence: the request and the sample."""
        return self.request_id, self.index

    @property
    def stream(self) -> int:
        """The random stream its seeded draws come from (runtime/seeding.py mix_seed)."""
        return self.params.sample_index + self.index

    @property
    def has_sampled(self) -> bool:
        """The model has chosen a token of it in this engine (not only prompt, resumed or forced ones)."""
        return self.first_token_time is not None

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @cached_property
    def distinct_prompt_tokens(self) -> list[int]:
        """The prompt's tokens, each once (the prompt never changes): what a repetition penalty's
        step reads of it, not the whole prompt again every step."""
        return sorted(set(self.prompt_token_ids))

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def max_length(self) -> int:
        """Prompt + max_tokens: the longest this sequence may grow (the engine caps it at max_model_len)."""
        return self.num_prompt_tokens + self.params.max_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def unscored(self) -> list[range]:
        """The positions of known tokens whose log probabilities are wanted and not recorded yet: the
        rest of the prompt (prompt_logprobs), and the output tokens the model did not sample in this
        engine (a forced tag; a resumed request's, when their values did not come with it)."""
        ranges = []
        if self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens:
            ranges.append(range(len(self.prompt_logprobs), self.num_prompt_tokens))
        if self.params.logprobs is not None and self.num_prompt_tokens + len(self.output_logprobs) < len(self):
            ranges.append(range(self.num_prompt_tokens + len(self.output_logprobs), len(self)))
        return ranges

    @property
    def reusable_prefix(self) -> int:
        """How many leading tokens a prefix-cache hit may serve: all but the last (its logits give the
        next token), and none from the row before an unscored position on (a hit computes no logits)."""
        unscored = self.unscored
        return min(len(self) - 1, max(unscored[0].start - 1, 0)) if unscored else len(self) - 1

    def record_logprob(self, position: int, value: TokenLogprob) -> None:
        """The log probability of the known token at `position`, scored in a step (positions in order)."""
        if position < self.num_prompt_tokens:
            assert self.prompt_logprobs is not None and position == len(self.prompt_logprobs)
            self.prompt_logprobs.append(value)
        else:
            assert position == self.num_prompt_tokens + len(self.output_logprobs)
            self.output_logprobs.append(value)

    def append_tokens(self, token_ids: list[int], logprobs: list[TokenLogprob] | None = None) -> None:
        """Tokens the model sampled, with their log probabilities when the request wants them."""
        if self.first_token_time is None:
            self.first_token_time = time.time()
        self.token_ids.extend(token_ids)
        if self.params.logprobs is not None:
            assert logprobs is not None and len(logprobs) == len(token_ids), "a sampled token comes with its value"
            self.output_logprobs += logprobs

    def truncate(self, length: int) -> None:
        """Keep the first `length` tokens (a stop string ended there), and their log probabilities."""
        del self.token_ids[length:]
        del self.output_logprobs[max(length - self.num_prompt_tokens, 0) :]

    def fork(self, index: int) -> Sequence:
        """Sample `index` of this request at this point: the same tokens and computed count, running,
        with no blocks yet (BlockManager.fork shares this sequence's)."""
        child = Sequence(self.request_id, self.prompt_token_ids, self.params, index, self.cache_salt)
        child.token_ids = list(self.token_ids)
        child.output_logprobs = list(self.output_logprobs)
        child.prompt_logprobs = self.prompt_logprobs  # complete by now, never changed again
        child.num_computed_tokens = self.num_computed_tokens
        child.num_cached_tokens = self.num_cached_tokens
        child.status = SequenceStatus.RUNNING
        child.arrival_time = self.arrival_time
        child.first_scheduled_time = self.first_scheduled_time
        return child

    def reset_for_recompute(self) -> None:
        """Preempted: the cache is given back; prompt and output so far are recomputed later."""
        self.block_table = []
        self.num_computed_tokens = 0
        self.draft_token_ids = []
        self.num_preemptions += 1
        self.status = SequenceStatus.WAITING
