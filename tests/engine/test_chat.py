"""Chat templates rendered like transformers, and the R1 usage conventions."""

from __future__ import annotations

import pytest

from ponder.engine.chat import MATH_DIRECTIVE, ChatTemplateError, apply_r1_conventions, render_chat_template
from ponder.engine.model_store import resolve_model
from ponder.engine.tokenizer import Tokenizer
from tests.references import reference_dir

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
]


@pytest.mark.parametrize("model", ["smollm2-135m", "tiny-qwen2"])
def test_rendering_matches_transformers(model):
    from transformers import AutoTokenizer

    ours = Tokenizer.from_pretrained(resolve_model(model))
    theirs = AutoTokenizer.from_pretrained(reference_dir(model))
    for add_generation_prompt in (True, False):
        expected = theirs.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert ours.apply_chat_template(CONVERSATION, add_generation_prompt=add_generation_prompt) == expected


def test_template_exceptions_become_clear_errors():
    tokenizer = Tokenizer.from_pretrained(resolve_model("tiny-llama"))  # refuses system messages
    with pytest.raises(ChatTemplateError, match="system messages are not supported"):
        tokenizer.apply_chat_template(CONVERSATION)


@pytest.mark.parametrize(
    "messages",
    [[], "hello", [{"role": "wizard", "content": "x"}], [{"role": "user", "content": 3}], [{"content": "no role"}]],
)
def test_bad_messages(messages):
    with pytest.raises(ChatTemplateError):
        render_chat_template("{{ messages }}", messages)


def test_missing_or_broken_template():
    with pytest.raises(ChatTemplateError, match="no chat template"):
        render_chat_template(None, [{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="does not parse"):
        render_chat_template("{% for %}", [{"role": "user", "content": "x"}])


def test_text_parts_are_joined():
    out = render_chat_template(
        "{{ messages[0]['content'] }}",
        [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
    )
    assert out == "ab"


def test_r1_conventions_fold_system_and_append_math_directive():
    messages = apply_r1_conventions(CONVERSATION, fold_system=True, math=True)
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[0]["content"] == "Be brief.\n\nWhat is 2+2?"
    assert messages[-1]["content"] == f"And 3+3?\n{MATH_DIRECTIVE}"
    assert CONVERSATION[1]["content"] == "What is 2+2?"  # the caller's list is untouched
    only_system = apply_r1_conventions([{"role": "system", "content": "S"}], fold_system=True)
    assert only_system == [{"role": "user", "content": "S"}]
    with pytest.raises(ChatTemplateError, match="no user message"):
        apply_r1_conventions([{"role": "system", "content": "S"}], fold_system=False, math=True)


def test_chat_through_the_engine_folds_system_for_r1_style_templates(make_llm):
    from ponder.engine import SamplingParams

    llm = make_llm("tiny-llama")
    params = SamplingParams(temperature=0, max_tokens=4)
    (out,) = llm.chat(CONVERSATION, params, fold_system=True)
    assert out.usage.prompt_tokens > 0
    with pytest.raises(ChatTemplateError):
        llm.chat(CONVERSATION, params)  # the template itself refuses system messages
