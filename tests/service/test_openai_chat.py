"""The OpenAI chat mapping without the stack: requests onto JobCreate, and what a chat stream sends
when its job's stream takes text back (a re-run after a worker died)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from ponder.service.errors import ServiceError, describe_validation_error, status_code_of
from ponder.service.openai.chat import job_request
from ponder.service.openai.chat_schemas import ChatCompletionCreate
from ponder.service.openai.streamed_text import Diverged, SentText
from ponder.service.schemas import JobCreate
from ponder.service.settings import Settings
from ponder.service.streams import JobEvent

SETTINGS = Settings(model="tiny-llama", _env_file=None)


def chat(**fields) -> ChatCompletionCreate:
    return ChatCompletionCreate(model="tiny-llama", messages=[{"role": "user", "content": "hi"}], **fields)


def test_a_request_maps_onto_job_create():
    request = job_request(
        ChatCompletionCreate(
            model="tiny-llama",
            messages=[
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": "ok", "reasoning_content": "dropped", "tool_calls": []},
                {"role": "user", "content": "c"},
            ],
            max_tokens=9,
            max_completion_tokens=7,
            stop="x",
            user="alice",
            seed=3,
        ),
        SETTINGS,
    )
    assert [(m.role, m.content) for m in request.messages or []] == [
        ("system", "Be brief."),
        ("user", "a\nb"),
        ("assistant", "ok"),
        ("user", "c"),
    ]
    assert (request.max_tokens, request.stop, request.seed, request.metadata) == (7, ["x"], 3, {"user": "alice"})
    assert request.temperature == 0.6  # unset: JobCreate's default, not OpenAI's 1
    assert job_request(chat(user="alice", metadata={"user": "bob"}), SETTINGS).metadata == {"user": "bob"}


def test_job_create_bounds_are_400s_in_openai_terms():
    with pytest.raises(ServiceError) as raised:
        job_request(chat(max_completion_tokens=0), SETTINGS)
    assert (status_code_of(raised.value), raised.value.param) == (400, "max_completion_tokens")
    assert raised.value.message.startswith("max_completion_tokens:")
    with pytest.raises(ServiceError) as raised:
        job_request(chat(max_tokens=0), SETTINGS)
    assert raised.value.param == "max_tokens"
    with pytest.raises(ServiceError) as raised:
        job_request(chat(top_p=0), SETTINGS)
    assert (status_code_of(raised.value), raised.value.param) == (400, "top_p")
    with pytest.raises(ServiceError) as raised:
        job_request(chat().model_copy(update={"model": "gpt-4o"}), SETTINGS)
    assert (status_code_of(raised.value), raised.value.code) == (404, "model_not_found")


def test_penalties_logit_bias_and_vllms_extras_reach_the_engine():
    request = job_request(
        chat(
            frequency_penalty=0.5,
            presence_penalty=-1,
            logit_bias={"5": -100, "7": 2.5},
            repetition_penalty=1.2,  # vLLM's, sent in extra_body
            min_p=0.1,
            min_tokens=3,
        ),
        SETTINGS,
    )
    # The job's stored request is JSON (token ids as strings), read back without validation.
    stored = JobCreate.from_stored(request.model_dump(mode="json", exclude_none=True))
    params = stored.sampling_params(16)
    assert (params.frequency_penalty, params.presence_penalty, params.repetition_penalty) == (0.5, -1, 1.2)
    assert (params.logit_bias, params.min_p, params.min_tokens) == ({5: -100.0, 7: 2.5}, 0.1, 3)
    plain = job_request(chat(), SETTINGS).sampling_params(16)
    assert (plain.frequency_penalty, plain.presence_penalty, plain.repetition_penalty) == (0, 0, 1)
    assert (plain.logit_bias, plain.min_p, plain.min_tokens) == ({}, 0, 0)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"frequency_penalty": 2.5}, "frequency_penalty"),
        ({"presence_penalty": -3}, "presence_penalty"),
        ({"logit_bias": {"5": 101}}, "logit_bias.5"),
        ({"logit_bias": {"-1": 1}}, "logit_bias.-1.[key]"),
        ({"logit_bias": {"five": 1}}, "logit_bias.five.[key]"),
        ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),  # OpenAI's 300 at most
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty"),
        ({"min_p": 1.5}, "min_p"),
        ({"min_tokens": -1}, "min_tokens"),
    ],
)
def test_sampler_values_out_of_range_are_400s_naming_them(fields, param):
    assert refusal(fields) == (400, param)


def refusal(fields: dict) -> tuple[int, str | None]:
    """(status, param) of a chat request refused by its own schema (FastAPI's validation, a 400 on
    the OpenAI routes) or by the JobCreate it maps to."""
    try:
        job_request(chat(**fields), SETTINGS)
    except ValidationError as e:
        return 400, describe_validation_error(e.errors(include_url=False))[1]
    except ServiceError as e:
        return status_code_of(e), e.param
    raise AssertionError(f"{fields} accepted")


def events(*pairs) -> list[JobEvent]:
    return [JobEvent(kind, data) for kind, data in pairs]


def feed(text: SentText, *pairs) -> list[dict[str, str]]:
    sent = []
    for event in events(*pairs):
        text.apply(event)
        sent.append(text.unsent())
    return sent


def test_a_rerun_that_writes_the_same_text_again_sends_only_what_is_new():
    text = SentText()
    assert feed(text, ("reasoning", {"delta": "abc"}), ("content", {"delta": "de"})) == [
        {"reasoning": "abc"},
        {"content": "de"},
    ]
    # restarted: the same text comes again, and only what goes past what was sent is sent
    assert feed(
        text,
        ("reset", {}),
        ("reasoning", {"delta": "ab"}),
        ("reasoning", {"delta": "c"}),
        ("content", {"delta": "d"}),
        ("content", {"delta": "ef"}),
    ) == [{}, {}, {}, {}, {"content": "f"}]
    # resumed from a checkpoint: cut back, then continued
    assert feed(text, ("rewind", {"reasoning": 3, "content": 1}), ("content", {"delta": "efg"})) == [
        {},
        {"content": "g"},
    ]


def test_a_rerun_with_other_text_cannot_be_shown():
    text = SentText()
    feed(text, ("reasoning", {"delta": "abc"}))
    with pytest.raises(Diverged):
        feed(text, ("reset", {}), ("reasoning", {"delta": "x"}))
