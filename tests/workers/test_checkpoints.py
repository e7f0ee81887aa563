"""Which checkpoint a re-run resumes from (ponder/workers/job_runner.py usable_checkpoint): the tokens of
the last flush, written by the model this worker serves, valid for it and the request; otherwise a
clean restart whose reason the job's record shows."""

from __future__ import annotations

import uuid
from datetime import timedelta

from ponder.service.settings import Settings
from ponder.service.tables import Job, utcnow
from ponder.workers.job_runner import usable_checkpoint

TINY = Settings(model="tiny-llama")


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
    assert usable_checkpoint(job(2, checkpoint), TINY, 320) == ([5, 6, 7], None)


def test_nothing_to_resume_is_a_plain_start():
    assert usable_checkpoint(job(1, None), TINY, 320) == (None, None)
    assert usable_checkpoint(job(2, None), TINY, 320) == (None, None)
    assert usable_checkpoint(job(2, {"model": "tiny-llama", "token_ids": []}), TINY, 320) == (None, None)


def test_a_checkpoint_that_cannot_be_used_restarts_saying_why():
    other_model = {"model": "tiny-qwen2", "token_ids": [5, 6]}
    tokens, reason = usable_checkpoint(job(2, other_model), TINY, 320)
    assert tokens is None and reason is not None and "'tiny-qwen2'" in reason and "'tiny-llama'" in reason
    for bad in ([5, 999], [5, -1], ["5"], list(range(9))):  # outside the vocab, not ints, over max_tokens
        tokens, reason = usable_checkpoint(job(2, {"model": "tiny-llama", "token_ids": bad}), TINY, 320)
        assert tokens is None and reason == "its checkpoint's token ids are not valid for this model and request"


def test_with_resume_turned_off_a_rerun_starts_over_saying_so():
    checkpoint = {"model": "tiny-llama", "token_ids": [5, 6, 7], "stream_id": "1-0"}
    off = Settings(model="tiny-llama", resume_from_checkpoint=False)
    tokens, reason = usable_checkpoint(job(2, checkpoint), off, 320)
    assert tokens is None and reason is not None and "PONDER_RESUME_FROM_CHECKPOINT" in reason
