"""What the engine hands back: per-step deltas, and the whole result once a request finishes."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Usage:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    completion_tokens: int = 0
    reasoning_tokens: int = 0  # completion tokens spent thinking (up to and including `</think>`)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "completion_tokens": self.completion_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "total_tokens": self.total_tokens,
        }


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0
    # Speculative decoding: drafts the model verified for this request, and how many it accepted.
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    @property
    def draft_acceptance_rate(self) -> float | None:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else None


@dataclass
class RequestOutput:
    """A step's news about one request. The delta fields carry what is new; `text`, `content`,
    `reasoning_content`, `answer` and `usage` are complete once `finished` is true."""

    request_id: str
    new_token_ids: list[int] = field(default_factory=list)
    delta_text: str = ""
    delta_reasoning: str = ""
    delta_content: str = ""
    finished: bool = False
    finish_reason: str | None = None  # stop | length | abort | error
    error: str | None = None  # with finish_reason "error": what failed while running this request
    prompt_token_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)  # all output ids so far
    text: str = ""
    reasoning_content: str = ""
    content: str = ""
    answer: str | None = None
    usage: Usage = field(default_factory=Usage)
    metrics: RequestMetrics | None = None
