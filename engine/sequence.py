"""One request's state as the scheduler and block manager see it. No torch."""

from __future__ import annotations

import time
from enum import Enum, auto

from engine.config import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    """Token ids (prompt then output), the block table, and how many tokens the KV cache holds.

    `num_computed_tokens` counts tokens whose K/V are in the cache; the tokens after it are what
    the next step must run (a chunk of the prompt, one decode token, or forced tokens).
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.request_id = request_id
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
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
        self.finish_reason: str | None = None
        self.arrival_time = time.time()
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.finished_time: float | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

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

    def append_tokens(self, token_ids: list[int]) -> None:
        if self.first_token_time is None:
            self.first_token_time = time.time()
        self.token_ids.extend(token_ids)

    def reset_for_recompute(self) -> None:
        """Preempted: the cache is given back; prompt and output so far are recomputed later."""
        self.block_table = []
        self.num_computed_tokens = 0
        self.draft_token_ids = []
        self.num_preemptions += 1
        self.status = SequenceStatus.WAITING
