"""The OpenAI chat mapping without the stack: requests onto JobCreate, and what a chat stream sends
when its job's stream takes text back (a re-run after a worker died)."""

from __future__ import annotations

import pytest

from ponder.service.errors import ServiceError, status_code_of
from ponder.service.openai.chat import job_request
from ponder.service.openai.chat_schemas import ChatCompletionCreate
from ponder.service.openai.streamed_text import Diverged, SentText
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
