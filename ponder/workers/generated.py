"""What the engine has sent back for a running job so far (ponder/workers/job_runner.py), and each
step's output added to it as the job's stream entries."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from ponder.engine.config import SamplingParams
from ponder.engine.outputs import RequestOutput, TokenLogprob
from ponder.service.logprobs import PackedRun, pack, stream_segment
from ponder.service.streams import LOGPROBS_TYPE, PROMPT_LOGPROBS_TYPE
from ponder.service.tables import Job, utcnow
from ponder.workers.vote import SampleVote


@dataclass
class GeneratedSoFar:
    """What the engine has sent back for the job so far (the last output ends it)."""

    reasoning: list[str] = field(default_factory=list)
    content: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)  # the checkpoint a re-run resumes from
    logprobs: PackedRun | None = None  # their values, when the job keeps them (params.logprobs of each)
    params: SamplingParams = field(default_factory=SamplingParams)  # how the engine samples the job
    prompt_logprobs_streamed: bool = False
    sample_tokens: dict[int, int] = field(default_factory=dict)  # output tokens so far, by sample
    completion_tokens: int = 0
    max_batch_size: int = 0
    first_token_at: datetime | None = None
    final: RequestOutput | None = None
    vote: SampleVote | None = None  # n > 1: the vote over the samples as they finish (may stop the rest)

    @classmethod
    def started(cls, params: SamplingParams) -> GeneratedSoFar:
        """A first attempt's: nothing yet."""
        return cls(logprobs=kept_run(params, []), params=params)

    @classmethod
    def resumed(
        cls, job: Job, token_ids: list[int], logprobs: list[TokenLogprob] | None, params: SamplingParams
    ) -> GeneratedSoFar:
        """Where the checkpoint left the job (its text, tokens and values were written in one flush)."""
        return cls(
            reasoning=[job.reasoning_content or ""],
            content=[job.content or ""],
            token_ids=list(token_ids),
            logprobs=kept_run(params, logprobs or []),
            params=params,
            sample_tokens={0: len(token_ids)},
            completion_tokens=len(token_ids),
            max_batch_size=job.max_batch_size,
            first_token_at=job.first_token_at,
        )


def record_output(generated: GeneratedSoFar, output: RequestOutput, batch_size: int) -> list[tuple[str, str, int, int]]:
    """Add one step's output to what the job generated; returns its stream entries (type, delta,
    completion tokens so far, sample). The text and checkpoint kept as progress are sample 0's."""
    generated.max_batch_size = max(generated.max_batch_size, batch_size)
    if output.new_token_ids and generated.first_token_at is None:
        generated.first_token_at = utcnow()
    entries = _prompt_logprobs_entry(generated, output)
    for sample in output.outputs:
        generated.completion_tokens += len(sample.new_token_ids)
        first = generated.sample_tokens.get(sample.index, 0)
        generated.sample_tokens[sample.index] = first + len(sample.new_token_ids)
        if sample.index == 0:
            generated.token_ids += sample.new_token_ids
            if generated.logprobs is not None:
                generated.logprobs.extend(sample.new_logprobs or [])
            generated.reasoning.append(sample.delta_reasoning)
            generated.content.append(sample.delta_content)
        deltas = [("reasoning", sample.delta_reasoning), ("content", sample.delta_content)]
        if sample.new_logprobs and (k := generated.params.logprobs) is not None:
            deltas.append((LOGPROBS_TYPE, stream_segment(first, sample.new_logprobs, k)))
        entries += [(kind, delta, generated.completion_tokens, sample.index) for kind, delta in deltas if delta]
    if generated.vote is not None:  # counts the samples that finished; may stop the others
        generated.vote.observe(output)
    if output.finished:
        generated.final = output
    return entries


def _prompt_logprobs_entry(generated: GeneratedSoFar, output: RequestOutput) -> list[tuple[str, str, int, int]]:
    """The prompt's values (after its first token), streamed once, before the first output's text
    (a legacy completion that echoes its prompt sends them with it)."""
    k = generated.params.prompt_logprobs
    if k is None or output.prompt_logprobs is None or generated.prompt_logprobs_streamed:
        return []
    generated.prompt_logprobs_streamed = True
    values = [value for value in output.prompt_logprobs[1:] if value is not None]
    return [(PROMPT_LOGPROBS_TYPE, pack(values, k), generated.completion_tokens, 0)]


def kept_run(params: SamplingParams, values: list[TokenLogprob]) -> PackedRun | None:
    """The run a job that keeps its tokens' values starts from (None: it keeps none)."""
    if params.logprobs is None:
        return None
    run = PackedRun(params.logprobs)
    run.extend(values)
    return run
