"""A finished job's row: the columns its final write sets (ponder/workers/job_runner.py `_finish`)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from ponder.engine.config import SamplingParams
from ponder.engine.outputs import RequestMetrics, RequestOutput
from ponder.service.job_public import SamplePublic
from ponder.service.logprobs import pack
from ponder.service.tables import JobStatus


def result_columns(
    output: RequestOutput,
    voted: dict,
    status: JobStatus,
    now: datetime,
    first_token_at: datetime | None,
    max_batch_size: int,
) -> dict:
    """Its result, usage and times; `voted`: the vote's columns of a job with n > 1 (ponder/workers/vote.py)."""
    return {
        "status": status,
        "content": output.content,
        "reasoning_content": output.reasoning_content,
        "answer": voted["vote"]["answer"] if voted else output.answer,
        "samples": _samples(output),
        **voted,
        "finish_reason": output.finish_reason,
        "cached_tokens": output.usage.cached_tokens,
        "completion_tokens": output.usage.completion_tokens,
        "reasoning_tokens": output.usage.reasoning_tokens,
        **_draft_usage(output.metrics),
        "max_batch_size": max_batch_size,
        "first_token_at": first_token_at,
        "finished_at": now,
        "lease_expires_at": None,
        "updated_at": now,
    }


def _samples(output: RequestOutput) -> list[dict] | None:
    """Each sample's result, for a job with n > 1 (job_public.SamplePublic's fields)."""
    if len(output.outputs) < 2:
        return None
    return [{name: getattr(sample, name) for name in SamplePublic.stored_fields()} for sample in output.outputs]


def _draft_usage(metrics: RequestMetrics | None) -> dict[str, int]:
    """The job's speculative-decoding counts, as Job columns. An output without metrics has none
    to report: the columns keep their defaults (a retried job never wrote them before its end)."""
    if metrics is None:
        return {}
    return {"draft_tokens": metrics.num_draft_tokens, "accepted_draft_tokens": metrics.num_accepted_tokens}


def kept_logprobs(output: RequestOutput, params: SamplingParams) -> dict[str, Any]:
    """Each sample's values and the prompt's (after its first token, which has none), packed
    (ponder/service/logprobs.py), for a job that keeps them."""
    kept: dict[str, Any] = {}
    if params.logprobs is not None:
        kept["logprobs"] = [pack(sample.logprobs or [], params.logprobs) for sample in output.outputs]
    if params.prompt_logprobs is not None and output.prompt_logprobs is not None:
        prompt = [value for value in output.prompt_logprobs[1:] if value is not None]
        kept["prompt_logprobs"] = pack(prompt, params.prompt_logprobs)
    return kept
