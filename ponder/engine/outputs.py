"""What the engine hands back: per-step deltas, and the whole result once a request finishes; a
request with n samples has one CompletionOutput per sample."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A token's log probability under the model's distribution at its position (before any
    sampling modification: temperature, penalties, masks), its rank there (1: the most likely) and
    the best alternatives, best first. `logprob` and `rank` are None only for a token the model
    never ran: the end of thinking forced by the thinking budget when it also reached max_tokens."""

    token_id: int
    logprob: float | None
    rank: int | None = None
    top: tuple[tuple[int, float], ...] = ()  # (token id, log probability)


@dataclass
class Usage:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    completion_tokens: int = 0  # summed over a request's samples
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
class CompletionOutput:
    """One sample's news in a step (vLLM's CompletionOutput): the delta fields carry what is new;
    `finish_reason`, the full token ids, texts, answer and counts are set once this sample has
    finished (in the step that finishes it, and in the request's final output)."""

    index: int  # which sample: 0..n-1
    new_token_ids: list[int] = field(default_factory=list)
    delta_text: str = ""
    delta_reasoning: str = ""
    delta_content: str = ""
    finish_reason: str | None = None  # stop | length | abort | error
    token_ids: list[int] = field(default_factory=list)  # all output ids
    text: str = ""
    reasoning_content: str = ""
    content: str = ""
    answer: str | None = None
    completion_tokens: int = 0
    reasoning_tokens: int = 0  # of those, spent thinking
    # With SamplingParams.logprobs: one per token of new_token_ids, and once finished one per token of
    # token_ids. A token is sent when its log probability is known (a forced tag's one step later).
    new_logprobs: list[TokenLogprob] | None = None
    logprobs: list[TokenLogprob] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """A step's news about one request. `outputs` holds a CompletionOutput for each sample with
    news this step (by index), and for all n once the request has `finished` (all its samples
    have). The single-sample fields (`new_token_ids`, the deltas, `finish_reason`, `token_ids`,
    `text`, `reasoning_content`, `content`, `answer`) are sample 0's, as a request with n=1 has
    one sample; the final ones are set once `finished` is true. `usage` and `metrics` are the
    whole request's: prompt tokens once, completion tokens summed over the samples."""

    request_id: str
    new_token_ids: list[int] = field(default_factory=list)
    delta_text: str = ""
    delta_reasoning: str = ""
    delta_content: str = ""
    finished: bool = False
    finish_reason: str | None = None  # stop | length | abort | error
    error: str | None = None  # with finish_reason "error": what failed while running this request
    prompt_token_ids: list[int] = field(default_factory=list)
    # With SamplingParams.prompt_logprobs: one per prompt token, None for the first (nothing precedes
    # it); set in the request's first output with news and in its final one.
    prompt_logprobs: list[TokenLogprob | None] | None = None
    token_ids: list[int] = field(default_factory=list)  # all output ids
    text: str = ""
    reasoning_content: str = ""
    content: str = ""
    answer: str | None = None
    new_logprobs: list[TokenLogprob] | None = None  # sample 0's, as new_token_ids
    logprobs: list[TokenLogprob] | None = None  # sample 0's, as token_ids
    usage: Usage = field(default_factory=Usage)
    metrics: RequestMetrics | None = None
    outputs: list[CompletionOutput] = field(default_factory=list)
