"""Which checkpoint a re-run resumes from (workers/job_runner.py usable_checkpoint): the tokens of
the last flush, written by the model this worker serves, valid for it and the request; otherwise a
clean restart whose reason the job's record shows."""

from __future__ import annotations

import uuid
from datetime import timedelta

from service.models import Job, utcnow
from workers.job_runner import usable_checkpoint


def job(attempts: int, checkpoint: dict | None) -> Job:
    return Job(
        api_key_id=uuid.uuid4(),
        model="tiny-llama",
        request={"prompt": "x", "max_tokens": 8},
        prompt_token_ids=[1],
        expires_at=utcnow() + timedelta(hours=1),
        attempts=attempts,
        checkpoint=checkpoint,
    )


def test_a_rerun_resumes_from_the_tokens_of_the_last_flush():
    checkpoint = {"model": "tiny-llama", "token_ids": [5, 6, 7], "stream_id": "1-0"}
    assert usable_checkpoint(job(2, checkpoint), "tiny-llama", 320) == ([5, 6, 7], None)


def test_nothing_to_resume_is_a_plain_start():
    assert usable_checkpoint(job(1, None), "tiny-llama", 320) == (None, None)
    assert usable_checkpoint(job(2, None), "tiny-llama", 320) == (None, None)
    assert usable_checkpoint(job(2, {"model": "tiny-llama", "token_ids": []}), "tiny-llama", 320) == (None, None)


def test_a_checkpoint_that_cannot_be_used_restarts_saying_why():
    other_model = {"model": "tiny-qwen2", "token_ids": [5, 6]}
    tokens, reason = usable_checkpoint(job(2, other_model), "tiny-llama", 320)
    assert tokens is None and reason is not None and "'tiny-qwen2'" in reason and "'tiny-llama'" in reason
    for bad in ([5, 999], [5, -1], ["5"], list(range(9))):  # outside the vocab, not ints, over max_tokens
        tokens, reason = usable_checkpoint(job(2, {"model": "tiny-llama", "token_ids": bad}), "tiny-llama", 320)
        assert tokens is None and reason == "its checkpoint's token ids are not valid for this model and request"
