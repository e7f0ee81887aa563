"""Self-consistency's early stop through the worker's own engine host (ponder/workers/engine_host.py) on
tiny-r1 (the real R1 tokenizer): the samples' tokens are scripted (the forward passes run; only the
token chosen from the logits is replaced), so their answers are known. Once four of six samples
agree, the leader cannot be overtaken: the job's vote (ponder/workers/vote.py SampleVote, as
ponder/workers/job_runner.py feeds it) stops the two still running through `EngineHost.abort_sample`, and
every KV block they held is free again. Then what the worker writes (`_finish`, on SQLite and
PostgreSQL): a job whose vote stopped sample 0 succeeded with the vote's answer; a cancelled one
stays cancelled."""

from __future__ import annotations

import time
import uuid
from datetime import timedelta

import pytest
import redis as redis_lib
import torch
from sqlmodel import Session

from ponder.engine import EngineConfig, SamplingParams
from ponder.engine.outputs import CompletionOutput, RequestOutput, Usage
from ponder.service.db import database_engine
from ponder.service.job_public import JobPublic
from ponder.service.tables import ApiKey, Job, utcnow
from ponder.workers import job_runner
from ponder.workers.engine_host import EngineHost
from ponder.workers.job_runner import GeneratedSoFar
from ponder.workers.vote import IsolatedClassifier, SampleVote
from tests.conftest import TEST_KV_CACHE_BYTES
from tests.workers.test_fencing import claimed, row

EOS, END_THINK = 1, 128799
QUESTION = [{"role": "user", "content": "What is 6*7? Please reason step by step."}]


class ScriptedSamples:
    """Stands in for `ModelRunner.sample`: sample i of a request gets the next id of script i. At
    the fork step one row per sample comes with the parent sequence; its random stream tells the
    sample (stream = sample index: sample_index is 0)."""

    def __init__(self, scripts: list[list[int]]) -> None:
        self.scripts = [list(script) for script in scripts]

    def __call__(self, logits, seqs, row_drafts=None, row_positions=None, row_streams=None):
        streams = row_streams or [seq.stream for seq in seqs]
        ids = [self.scripts[stream].pop(0) for stream in streams]
        tokens = torch.tensor(ids, dtype=torch.int64, device=logits.device)
        return tokens, torch.zeros_like(tokens, dtype=torch.bool)


@pytest.fixture(scope="module")
def host():
    return EngineHost("tiny-r1", EngineConfig(max_model_len=1024, max_num_seqs=8, kv_cache_memory=TEST_KV_CACHE_BYTES))


def answer_script(tokenizer, thought: str, answer: str) -> list[int]:
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    return [*encode(thought), END_THINK, *encode(f"\n\nThe answer is \\boxed{{{answer}}}."), EOS]


def test_the_vote_stops_the_samples_that_cannot_change_it_and_their_blocks_are_freed(host, monkeypatch):
    tokenizer = host.engine.tokenizer
    # samples 0-3 answer 42 in four forms, one after another (each script a token longer); 4 and 5
    # would think for 300 tokens
    quick = [answer_script(tokenizer, "Six sevens.", form) for form in ["42", "42.0", "\\frac{84}{2}", "42"]]
    filler, longest = tokenizer.encode("!", add_special_tokens=False), max(map(len, quick))
    quick = [filler * (longest + i - len(script)) + script for i, script in enumerate(quick)]  # lengths L, L+1, ..
    long_thought = tokenizer.encode(" hmm" * 300, add_special_tokens=False)[:300]
    scripts = [*quick, [*long_thought, EOS], [*long_thought, EOS]]
    monkeypatch.setattr(host.engine.model_runner, "sample", ScriptedSamples(scripts))
    blocks = host.engine.scheduler.block_manager
    free_at_start = blocks.num_free_blocks

    request = {"n": 6, "max_tokens": 400, "vote": {"early_stop": True}}
    classifier = IsolatedClassifier()
    vote = SampleVote.for_request(request, lambda i: host.abort_sample("sc", i), classifier)
    assert vote is not None
    handle = host.submit("sc", tokenizer.encode_chat(QUESTION), SamplingParams(n=6, max_tokens=400))
    final, deadline = None, time.monotonic() + 300
    try:
        while final is None and time.monotonic() < deadline:
            for event in handle.get_all(timeout=0.25):
                assert event.error is None and event.output is not None
                vote.observe(event.output)
                final = event.output if event.output.finished else final
    finally:
        classifier.close()
    assert final is not None, "the request never finished"

    by_index = {c.index: c for c in final.outputs}
    assert [by_index[i].answer for i in range(4)] == ["42", "42.0", "\\frac{84}{2}", "42"]
    assert [by_index[i].finish_reason for i in range(6)] == ["stop"] * 4 + ["abort"] * 2
    assert vote.stopped == {4, 5}
    assert all(by_index[i].completion_tokens < 300 for i in (4, 5))  # stopped well before their end
    record = vote.record(final)
    assert record["stopped_early"] is True
    assert record["early_stop_unspent_tokens"] == sum(400 - by_index[i].completion_tokens for i in (4, 5))
    assert record["vote"]["answer"] == "42"
    assert (record["vote"]["count"], record["vote"]["n"], record["vote"]["agreement"]) == (4, 6, 4 / 6)
    assert record["vote"]["groups"] == [{"answer": "42", "count": 4, "samples": [0, 1, 2, 3]}]
    assert final.usage.completion_tokens == sum(c.completion_tokens for c in final.outputs)
    assert blocks.num_free_blocks == free_at_start  # the stopped samples' blocks (and all others) are free
    assert not host.engine.has_unfinished_requests()


@pytest.fixture
def redis_client(settings):
    return redis_lib.Redis.from_url(settings.redis_url, decode_responses=True)


def queued_job(settings, request: dict) -> uuid.UUID:
    with Session(database_engine(settings.database_url)) as session:
        key = ApiKey(name="t", prefix=uuid.uuid4().hex[:8], key_hash=uuid.uuid4().hex * 2)
        job = Job(
            api_key_id=key.id,
            model="tiny-llama",
            request=request,
            prompt_token_ids=[1, 2, 3],
            expires_at=utcnow() + timedelta(hours=1),
        )
        session.add_all([key, job])
        session.commit()
        return job.id


def test_a_job_whose_vote_stopped_sample_0_succeeded_with_its_vote(settings, redis_client):
    """Sample 0 stopped by the vote ends `abort`, as a cancelled job's would: the job still
    succeeded, its answer is the vote's, and the row shows the vote, stopped_early and the stopped
    samples' budget left (ponder/workers/job_runner.py _finish, on SQLite and PostgreSQL)."""
    job_id = queued_job(settings, {"prompt": "x", "max_tokens": 50, "n": 3, "vote": {"early_stop": True}})
    job, claim, _ = claimed(settings, redis_client, job_id, "worker-a")
    stopped: list[int] = []
    generated = GeneratedSoFar(vote=SampleVote.for_request(job.request, stopped.append))
    assert generated.vote is not None
    finishing = [CompletionOutput(1, finish_reason="stop", answer="7"), CompletionOutput(2, finish_reason="stop")]
    generated.vote.observe(RequestOutput("r", outputs=finishing[:1]))
    assert stopped == []  # 1 > 0 + 2 running? no
    finishing[1].answer = "7.0"
    generated.vote.observe(RequestOutput("r", outputs=finishing[1:]))
    assert stopped == [0]  # 2 > 0 + 1 running
    final = RequestOutput(
        "r",
        finished=True,
        finish_reason="abort",
        outputs=[CompletionOutput(0, finish_reason="abort", completion_tokens=5), *finishing],
    )
    final.usage = Usage(prompt_tokens=3, completion_tokens=5)
    generated.final = final
    assert job_runner._finish(job, claim, generated, settings) == "succeeded"
    public = JobPublic.model_validate(row(settings, job_id))
    assert (public.status, public.answer, public.stopped_early, public.early_stop_unspent_tokens) == (
        "succeeded",
        "7",
        True,
        45,
    )
    assert public.vote is not None and (public.vote.count, public.vote.agreement) == (2, 2 / 3)
    assert public.vote.groups[0].samples == [1, 2]


def test_a_cancelled_n_job_is_cancelled_not_voted_away(settings, redis_client):
    job_id = queued_job(settings, {"prompt": "x", "max_tokens": 50, "n": 2})
    job, claim, _ = claimed(settings, redis_client, job_id, "worker-a")
    generated = GeneratedSoFar(vote=SampleVote.for_request(job.request, lambda i: None))
    final = RequestOutput(
        "r",
        finished=True,
        finish_reason="abort",
        outputs=[CompletionOutput(0, finish_reason="abort"), CompletionOutput(1, finish_reason="abort")],
    )
    assert generated.vote is not None
    generated.vote.observe(final)
    generated.final = final
    assert job_runner._finish(job, claim, generated, settings) == "cancelled"
    stored = row(settings, job_id)
    assert (stored.stopped_early, stored.vote) == (
        False,
        {"answer": None, "count": 0, "n": 2, "agreement": 0.0, "groups": [], "unparsed": []},
    )
