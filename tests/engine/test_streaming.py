"""Streaming: the deltas of every step concatenate to exactly the final text, multi-byte UTF-8 included."""

from __future__ import annotations

import pytest

from ponder.engine import SamplingParams

MULTILINGUAL = [
    "Translate to Chinese: good morning, my friend.",
    "请用中文介绍一下你自己。",
    "Write three emoji that describe the sea 🌊 and explain them.",
    "¿Dónde está la biblioteca? Responde en español.",
    "Скажи что-нибудь по-русски.",
    "日本語で挨拶してください。",
    "مرحبا، كيف حالك؟",
    "Ελληνικά: πες μου μια λέξη.",
]


def stream(llm, prompts: list[list[int]], params: SamplingParams, valid_utf8: bool = True) -> dict[str, dict]:
    engine = llm.engine
    for i, prompt in enumerate(prompts):
        engine.add_request(f"s{i}", prompt, params)
    seen: dict[str, dict] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            entry = seen.setdefault(out.request_id, {"text": "", "reasoning": "", "content": "", "ids": []})
            entry["text"] += out.delta_text
            entry["reasoning"] += out.delta_reasoning
            entry["content"] += out.delta_content
            entry["ids"] += out.new_token_ids
            if out.finished:
                entry["final"] = out
                # A character streamed broken (U+FFFD) must be broken in the whole text too (a
                # sampled byte sequence can be invalid UTF-8); never half of a valid character.
                if valid_utf8 and "\ufffd" in entry["text"]:
                    assert "\ufffd" in llm.tokenizer.decode(out.token_ids), "a broken character was streamed"
    return seen


def test_multilingual_deltas_concatenate_to_final_text(make_llm):
    llm = make_llm("smollm2-135m")
    prompts = [llm.tokenizer.encode_chat([{"role": "user", "content": p}]) for p in MULTILINGUAL]
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=48)
    results = stream(llm, prompts, params)
    non_ascii = 0
    for entry in results.values():
        final = entry["final"]
        assert entry["text"] == final.text
        assert entry["ids"] == final.token_ids
        assert final.text == llm.tokenizer.decode(final.token_ids)
        assert entry["content"] == final.content and entry["reasoning"] == final.reasoning_content
        non_ascii += any(ord(c) > 127 for c in final.text)
    assert non_ascii >= 3, "the prompts should produce non-ASCII output"


def test_byte_level_model_splits_characters_across_tokens(make_llm):
    # tiny-llama's tokens are single bytes: every multi-byte character arrives in pieces (and its
    # random weights also write invalid sequences, which decode to U+FFFD like a full decode does).
    llm = make_llm("tiny-llama")
    prompts = [list("日本語 🌊 ñ".encode()), list("中文".encode())]
    params = SamplingParams(temperature=1.0, seed=11, max_tokens=64, ignore_eos=True)
    results = stream(llm, prompts, params, valid_utf8=False)
    for entry in results.values():
        final = entry["final"]
        assert entry["text"] == final.text == llm.tokenizer.decode(final.token_ids)


@pytest.mark.parametrize("stop", [["\n"], ["ab", "the"]])
def test_stop_strings_never_stream_partially(make_llm, stop):
    llm = make_llm("smollm2-135m")
    prompt = llm.tokenizer.encode_chat([{"role": "user", "content": "Write a short poem about the sea."}])
    results = stream(llm, [prompt], SamplingParams(temperature=0.7, seed=1, max_tokens=60, stop=stop))
    entry = results["s0"]
    assert entry["text"] == entry["final"].text
    assert not any(s in entry["text"] for s in stop)
